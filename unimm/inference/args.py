"""Configs of the inference programs (`unimm-chat`, `unimm-generate-t2i`), read by `unimm.utils.config.parse_config`.

The chat prompt's format is the data layer's `ChatFormatConfig`, the same fields finetuning reads, so a model is
asked questions the way it was trained. Deprecated alias: `tokenizer_path` -> `visual_tokenizer_path`.
"""

from __future__ import annotations

from dataclasses import dataclass

from unimm.data.tasks import ChatFormatConfig
from unimm.train.args import VISUAL_TOKENIZER_ALIAS
from unimm.utils.config import config_field
from unimm.utils.errors import OptionError


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None,
                   greedy: bool | None = None) -> None:
    """Refuse sampling options outside their range, naming the option: `temperature` > 0 (0 means greedy where
    `greedy` is None; with `greedy` False it must be positive), `top_k` >= 0, 0 < `top_p` <= 1. Out-of-range values
    would otherwise be silently treated as "off" by the sampler."""
    if not temperature >= 0 or (greedy is False and not temperature > 0):
        raise ValueError(f"temperature must be {'> 0 when sampling' if greedy is False else '>= 0 (0 = greedy)'}, "
                         f"got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or unset = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or unset = off), got {top_p}")


def max_positions(model) -> int | None:
    """How many positions the wrapped LLM was built for (`max_position_embeddings`), None when it does not say."""
    return getattr(model.config.text_config, "max_position_embeddings", None)


def check_prompt_lengths(prompts: list[str], text_tokenizer, max_positions: int | None, image_positions: int,
                         option: str = "prompts") -> None:
    """Refuse a prompt whose tokens plus the `image_positions` it must be followed by (the image, or the longest
    answer) cannot fit the model's `max_positions` (its `max_position_embeddings`; None = unlimited)."""
    if not max_positions:
        return
    for index, prompt in enumerate(prompts):
        length = len(text_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length + image_positions > max_positions:
            raise OptionError(f"{option}[{index}] has {length} tokens; with the {image_positions} positions that "
                             f"follow it that exceeds the model's {max_positions} positions "
                             "(max_position_embeddings): shorten it")


@dataclass
class InferenceArguments:
    """Which trained model to run, and where."""

    config_aliases = (VISUAL_TOKENIZER_ALIAS,)

    model_path: str = config_field(None, "A UniMM model directory (pretrain/finetune output, merged LoRA), or a "
                                   "LoRA checkpoint (merged in memory).")
    visual_tokenizer_path: str = config_field(None, "The visual tokenizer the model was trained with (decodes "
                                              "generated codes / encodes input images); optional for a model with a "
                                              "vision tower (LLaVA-style), which encodes input images.")
    vision_tower: str | None = config_field(None, "A model with a vision tower: a local folder replacing the tower "
                                            "folder recorded in its config.json.")
    device: str = config_field("auto", "cuda, cpu, or auto (cuda when available).")
    dtype: str = config_field("auto", "Weight dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, "
                              "float16.")
    seed: int = config_field(0, "Sampling seed (results are deterministic for a seed and batch size).")
    allow_visual_tokenizer_mismatch: bool = config_field(
        False, "Use visual_tokenizer_path even when its config or weights hash differs from the visual tokenizer "
        "the model was trained with (recorded in its config.json); warns instead of refusing.")

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path is required")


@dataclass
class GenerateArguments:
    """Text-to-image sampling (`unimm-generate-t2i`)."""

    prompts: list[str] = config_field([], "Prompts, one image each.")
    prompts_file: str | None = config_field(None, "A text file with one prompt per line (added to prompts).")
    output_dir: str = config_field("generated", "Where the PNGs, grid.png and prompts.json are written.")
    cfg_scale: float = config_field(3.0, "Classifier-free guidance scale; 0 disables guidance.")
    negative_prompt: str | None = config_field(
        None, "Text of guidance's second branch for every prompt, in place of the unconditional prefix: the images "
              "move away from it. Needs cfg_scale > 0.")
    temperature: float = config_field(1.0, "Sampling temperature; 0 = greedy.")
    top_k: int | None = config_field(None, "Keep only the k most likely codes per step.")
    top_p: float | None = config_field(None, "Nucleus sampling threshold.")
    batch_size: int = config_field(8, "Prompts sampled together (CFG doubles the rows).")
    decode: str = config_field("eager", (
        "Decode loop: eager (dynamic KV cache), static (fixed-shape cache), compile (static + torch.compile, eager "
        "when compiling fails), jacobi / jacobi-compile (speculative Jacobi decoding; flat-code models only). Greedy "
        "codes are the same in every mode."))
    grid_columns: int = config_field(8, "Images per row of grid.png.")
    rerank_samples: int = config_field(0, (
        "Best-of-N: draw this many sampled candidates per prompt besides the configured decoding's image and keep "
        "the one with the lowest caption NLL (the prompt read back off the image) + image NLL (the image under the "
        "prompt), both by the model itself (unimm.inference.rerank); 0 = off. Models that read images as codes."))
    rerank_temperature: float = config_field(1.0, "Sampling temperature of the rerank candidates (top_k / top_p as "
                                             "given).")

    def all_prompts(self) -> list[str]:
        for index, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ValueError(f"prompts[{index}] is empty: an empty prompt gives an unconditional image; write "
                                 "what to draw")
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
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.rerank_samples < 0:
            raise ValueError(f"rerank_samples must be >= 0 (0 = off), got {self.rerank_samples}")
        if not self.rerank_temperature > 0:
            raise ValueError(f"rerank_temperature must be > 0 (the candidates are sampled), got "
                             f"{self.rerank_temperature}")
        from unimm.llm.generation import DECODE_MODES

        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if not self.cfg_scale >= 0:  # also refuses NaN
            raise ValueError(f"cfg_scale must be >= 0 (0 = no guidance), got {self.cfg_scale}: a negative scale "
                             "steers images away from their prompt")
        if self.negative_prompt is not None and not self.cfg_scale:
            raise ValueError("negative_prompt is guidance's second branch: set cfg_scale > 0")
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise ValueError("negative_prompt is empty: leave it out to guide against the unconditional prefix")


@dataclass
class ChatArguments(ChatFormatConfig):
    """Image question answering (`unimm-chat`); the chat format fields are the finetuning ones."""

    images: list[str] = config_field([], "Image files: one image (asked every question) or one per question; none "
                                     "for text-only questions.")
    questions: list[str] = config_field([], "Questions (one answer each).")
    output_json: str | None = config_field(None, "Also write [{image, question, answer}] to this file.")
    max_new_tokens: int = config_field(64, "Longest answer in tokens.")
    do_sample: bool = config_field(False, "Sample instead of greedy decoding.")
    temperature: float = config_field(1.0, "Sampling temperature (with do_sample).")
    top_p: float | None = config_field(None, "Nucleus sampling threshold (with do_sample).")

    def __post_init__(self) -> None:
        check_sampling(temperature=self.temperature, top_p=self.top_p, greedy=not self.do_sample)
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def pairs(self) -> list[tuple[str | None, str]]:
        if not self.questions:
            raise ValueError("no questions: pass --questions 'what colour is the shape?' ...")
        for index, question in enumerate(self.questions):
            if not question.strip():
                raise ValueError(f"questions[{index}] is empty: ask something")
        if len(self.images) > 1 and len(self.images) != len(self.questions):
            raise ValueError(f"{len(self.images)} images for {len(self.questions)} questions: pass one image, or "
                             "one image per question")
        images = self.images if len(self.images) > 1 else [self.images[0] if self.images else None] * len(
            self.questions)
        return list(zip(images, self.questions))
