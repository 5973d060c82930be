"""Configs of the LLM entry points (`scripts/pretrain.py`, `scripts/finetune.py`), read by
`unimm.utils.config.parse_config` from YAML files plus `--key value` overrides.

`ModelArguments` says where the model comes from and which parts train, `DataArguments` what it trains on,
`LoraArguments` whether and how to wrap it with LoRA, and `UniMMTrainingArguments` is
`transformers.TrainingArguments` plus throughput/MFU logging and automatic resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments


def _help(text: str, **kwargs: Any) -> dict[str, Any]:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class ModelArguments:
    """Where the UniMM model comes from and which of its parts are trained."""

    llm_path: str | None = field(default=None, **_help(
        "Local directory of a Hugging Face causal LM (Qwen2/2.5/3, LLaMA) with its tokenizer; extended with "
        "visual tokens. Ignored when model_path is set."))
    tokenizer_path: str | None = field(default=None, **_help(
        "Local directory of a trained UniMM visual tokenizer (unimm.tokenizer.load_tokenizer); its codebook_spec "
        "sizes the visual tables, and it encodes images on the fly when no code cache covers them."))
    model_path: str | None = field(default=None, **_help(
        "Local directory of an existing UniMM model (output of pretrain/finetune/merge_lora) to continue from."))
    flat_codes: bool = field(default=False, **_help(
        "Single-codebook tokenizers only: add the codes to the text vocabulary so the LM head predicts them."))
    model_config_overrides: str | None = field(default=None, **_help(
        "JSON object of UniMMConfig fields for a new model (e.g. depth-head sizes), ignored with model_path."))
    attn_implementation: str = field(default="auto", **_help(
        "Attention kernel: auto (flash_attention_2 when available on GPU, else sdpa), sdpa, eager, flash_attention_2."))
    torch_dtype: str = field(default="auto", **_help(
        "Weight dtype when loading: auto (bfloat16 when --bf16, else float32), float32, bfloat16, float16."))
    train_llm: bool = field(default=True, **_help("Train the LLM transformer body (and its full embedding tables)."))
    train_new_embeddings: bool = field(default=True, **_help(
        "Train the embedding / LM-head rows added for visual tokens (only those rows when train_llm is false)."))
    train_visual_heads: bool = field(default=True, **_help("Train the visual code embeddings and depth heads."))
    train_projector: bool = field(default=True, **_help(
        "Train the projector from continuous visual features (VQRAE understanding) to the LLM width."))

    def config_overrides(self) -> dict[str, Any]:
        if not self.model_config_overrides:
            return {}
        if isinstance(self.model_config_overrides, dict):
            return dict(self.model_config_overrides)
        try:
            value = json.loads(self.model_config_overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"model_config_overrides must be a JSON object, got {self.model_config_overrides!r}") \
                from err
        if not isinstance(value, dict):
            raise ValueError(f"model_config_overrides must be a JSON object, got {self.model_config_overrides!r}")
        return value

    def __post_init__(self) -> None:
        if self.model_path is None and (self.llm_path is None or self.tokenizer_path is None):
            raise ValueError("set model_path (an existing UniMM model), or both llm_path and tokenizer_path")
        if isinstance(self.model_config_overrides, dict):
            self.model_config_overrides = json.dumps(self.model_config_overrides)
        self.config_overrides()  # validate early


@dataclass
class DataArguments:
    """What the model trains on. Pretraining mixes tasks from a code cache; finetuning reads LLaVA JSON."""

    code_cache: str | None = field(default=None, **_help(
        "Directory of a code cache written by scripts/pretokenize.py (Arrow shards + cache_info.json)."))
    conversation_json: str | None = field(default=None, **_help(
        "LLaVA-format conversation JSON (list of {id, image?, conversations}) for conversation samples."))
    image_folder: str | None = field(default=None, **_help(
        "Folder that relative image paths in conversation_json are resolved against."))
    conversation_code_cache: str | None = field(default=None, **_help(
        "Code cache of the conversation images (keyed by image path); default: code_cache, else images are read "
        "from image_folder and encoded on the fly (needs a model with a feature projector)."))
    text_data: str | None = field(default=None, **_help("A text or jsonl file ({'text': ...}) of text-only samples."))
    caption_weight: float = field(default=1.0, **_help("Mixture weight of caption (image -> text) samples."))
    t2i_weight: float = field(default=1.0, **_help("Mixture weight of text-to-image samples."))
    conversation_weight: float = field(default=0.0, **_help("Mixture weight of LLaVA conversation samples."))
    text_weight: float = field(default=0.0, **_help("Mixture weight of text-only samples."))
    uncond_prob: float = field(default=0.1, **_help(
        "Probability that a text-to-image prompt is replaced by the unconditional token (for CFG)."))
    num_samples: int | None = field(default=None, **_help(
        "Samples per epoch drawn from the mixture; default: the size of the largest source."))
    max_length: int = field(default=2048, **_help("Maximum tokens per sample (and per packed row)."))
    packing: bool = field(default=False, **_help("Pack several samples per row (position_ids restart per sample)."))
    max_bad_fraction: float = field(default=0.01, **_help(
        "Fraction of unreadable/missing samples tolerated (skipped and counted) before the run stops."))
    chat_format: str = field(default="auto", **_help(
        "Conversation format: auto (the tokenizer's chat template, else llama-2), chat_template, llama-2, plain."))
    chat_end_token: str | None = field(default=None, **_help(
        "Token closing an assistant turn (supervised); default: detected (<|im_end|> for Qwen)."))
    system_prompt: str | None = field(default=None, **_help("System message prepended to every conversation."))
    data_seed_offset: int = field(default=0, **_help("Added to the training seed for the mixture's sampling RNG."))
    allow_outside_image_folder: bool = field(default=False, **_help(
        "Let record image paths leave --image_folder (absolute paths, '..', symlinks); by default such records are "
        "skipped and counted."))
    allow_tokenizer_weights_mismatch: bool = field(default=False, **_help(
        "Train on a code cache made by a visual tokenizer with the same config but other weights (refused by "
        "default, naming both weight hashes)."))

    def __post_init__(self) -> None:
        for name in ("caption_weight", "t2i_weight", "conversation_weight", "text_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")


@dataclass
class LoraArguments:
    """LoRA (peft) wrapping for finetuning; the new token rows, visual heads and projector stay fully trainable."""

    use_lora: bool = field(default=False, **_help("Wrap the LLM's linear layers with LoRA adapters (peft)."))
    lora_r: int = field(default=16, **_help("LoRA rank."))
    lora_alpha: int = field(default=32, **_help("LoRA scaling numerator (scale = alpha / r)."))
    lora_dropout: float = field(default=0.05, **_help("Dropout on the LoRA branch input."))
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", **_help(
        "Comma-separated names of LLM linear modules that get adapters."))

    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def __post_init__(self) -> None:
        if self.use_lora and (self.lora_r <= 0 or not self.target_modules()):
            raise ValueError("use_lora needs lora_r > 0 and at least one lora_target_modules entry")


@dataclass
class UniMMTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with UniMM's defaults and throughput logging."""

    remove_unused_columns: bool = field(default=False, **_help(
        "Keep every collated key (visual_codes, image_features ...); UniMM batches are not plain text columns."))
    peak_tflops: float | None = field(default=None, **_help(
        "Peak TFLOP/s per device for the MFU estimate; default: the GPU's dense bf16 peak, or a measured matmul "
        "rate on CPU."))
    auto_resume: bool = field(default=True, **_help(
        "Resume from the latest checkpoint-* in output_dir when resume_from_checkpoint is not given."))
    save_final_model: bool = field(default=True, **_help(
        "Write the final model (HF format, ZeRO-3 weights gathered) to output_dir after training."))

    def __post_init__(self) -> None:
        if not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            _configure_cpu_distributed_state(deepspeed=bool(self.deepspeed))
            config = self.accelerator_config
            if config is None:
                self.accelerator_config = {"use_configured_state": True}
            elif isinstance(config, dict):
                self.accelerator_config = {**config, "use_configured_state": True}
        super().__post_init__()


def _configure_cpu_distributed_state(deepspeed: bool) -> None:
    """Let the Trainer run several gloo ranks on a CPU-only machine (`deepspeed --num_gpus N` or `torchrun`), e.g.
    tests and the quickstart.

    Without CUDA, `accelerate` picks no process-group backend for a launcher-started run and treats every rank as
    a single process: DeepSpeed's batch-size check fails, and under torchrun each rank would silently train its own
    model. We configure its shared state ourselves with gloo (and DeepSpeed's communication layer when DeepSpeed
    is used); the Trainer reuses it (`use_configured_state`) and wraps the model in DDP or DeepSpeed.
    """
    from accelerate import PartialState

    # PartialState is a borg: once configured in this process, constructing it again is a no-op.
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        # cpu=True is what makes accelerate treat plain (non-DeepSpeed) gloo ranks as one MULTI_CPU job
        PartialState(backend="gloo", cpu=not deepspeed)
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


@dataclass
class InferenceArguments:
    """Which trained model to run, and where."""

    model_path: str = field(default=None, **_help(
        "A UniMM model directory (pretrain/finetune output, merged LoRA), or a LoRA checkpoint (merged in memory)."))
    tokenizer_path: str = field(default=None, **_help(
        "The visual tokenizer the model was trained with (decodes generated codes / encodes input images)."))
    device: str = field(default="auto", **_help("cuda, cpu, or auto (cuda when available)."))
    dtype: str = field(default="auto", **_help("Weight dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                                                "bfloat16, float16."))
    seed: int = field(default=0, **_help("Sampling seed (results are deterministic for a seed and batch size)."))

    def __post_init__(self) -> None:
        if not self.model_path or not self.tokenizer_path:
            raise ValueError("model_path and tokenizer_path are required")


@dataclass
class GenerateArguments:
    """Text-to-image sampling (scripts/generate_t2i.py)."""

    prompts: list[str] = field(default_factory=list, **_help("Prompts, one image each."))
    prompts_file: str | None = field(default=None, **_help("A text file with one prompt per line (added to prompts)."))
    output_dir: str = field(default="generated", **_help("Where the PNGs, grid.png and prompts.json are written."))
    cfg_scale: float = field(default=3.0, **_help("Classifier-free guidance scale; 0 disables guidance."))
    temperature: float = field(default=1.0, **_help("Sampling temperature; 0 = greedy."))
    top_k: int | None = field(default=None, **_help("Keep only the k most likely codes per step."))
    top_p: float | None = field(default=None, **_help("Nucleus sampling threshold."))
    batch_size: int = field(default=8, **_help("Prompts sampled together (CFG doubles the rows)."))
    grid_columns: int = field(default=8, **_help("Images per row of grid.png."))

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file:
            with open(self.prompts_file) as f:
                prompts.extend(line.strip() for line in f if line.strip())
        if not prompts:
            raise ValueError("no prompts: pass --prompts 'a red circle' ... or --prompts_file FILE")
        return prompts

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.grid_columns <= 0:
            raise ValueError("batch_size and grid_columns must be positive")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class ChatArguments:
    """Image question answering (scripts/chat.py)."""

    images: list[str] = field(default_factory=list, **_help(
        "Image files: one image (asked every question) or one per question; none for text-only questions."))
    questions: list[str] = field(default_factory=list, **_help("Questions (one answer each)."))
    output_json: str | None = field(default=None, **_help("Also write [{image, question, answer}] to this file."))
    max_new_tokens: int = field(default=64, **_help("Longest answer in tokens."))
    do_sample: bool = field(default=False, **_help("Sample instead of greedy decoding."))
    temperature: float = field(default=1.0, **_help("Sampling temperature (with do_sample)."))
    top_p: float | None = field(default=None, **_help("Nucleus sampling threshold (with do_sample)."))
    chat_format: str = field(default="auto", **_help(
        "Conversation format, as in training: auto, chat_template, llama-2, plain."))
    chat_end_token: str | None = field(default=None, **_help("Token closing an assistant turn, as in training."))
    system_prompt: str | None = field(default=None, **_help("System message, as in training."))

    def pairs(self) -> list[tuple[str | None, str]]:
        if not self.questions:
            raise ValueError("no questions: pass --questions 'what colour is the shape?' ...")
        if len(self.images) > 1 and len(self.images) != len(self.questions):
            raise ValueError(f"{len(self.images)} images for {len(self.questions)} questions: pass one image, or "
                             "one image per question")
        images = self.images if len(self.images) > 1 else [self.images[0] if self.images else None] * len(
            self.questions)
        return list(zip(images, self.questions))
