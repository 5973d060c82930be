"""Configs of the LLM training programs (`unimm-pretrain`, `unimm-finetune`), typed dataclasses read by
`unimm.utils.config.parse_config` from YAML files plus `--key value` overrides.

- `ModelArguments`: where the model comes from and which parts train;
- `VisualModulesConfig` (`unimm.llm.presets`): a new model's visual-module sizes, a named preset plus fields;
- `DataArguments`: the data layer's own `MixtureConfig` and `SampleConfig` (what is mixed, how records become
  sequences; their fields, help and checks live there) plus collation;
- `LoraArguments`: whether and how to wrap the model with LoRA;
- `UniMMTrainingArguments`: `transformers.TrainingArguments` plus throughput/MFU logging, automatic resume and
  modality-length grouping. Parsing it has no side effect: transformers' device setup (which starts the process
  group) runs in `finalize()`, called by `unimm.utils.runtime.prepare_training_arguments`.

Deprecated aliases (one warning each): `tokenizer_path` -> `visual_tokenizer_path`, `torch_dtype` -> `dtype` (the
one name of a weight dtype in every program, as in `from_pretrained(dtype=...)`), `model_config_overrides` (a JSON
string) -> `model_preset` and the typed visual-module fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from unimm.data.mixture import MixtureConfig
from unimm.data.tasks import SampleConfig
from unimm.llm.presets import VisualModulesConfig
from unimm.utils.config import Alias, config_field
from unimm.utils.runtime import check_cpu_matmul_precision

__all__ = ["DTYPE_ALIAS", "DataArguments", "LoraArguments", "ModelArguments", "UniMMTrainingArguments",
           "VisualModulesConfig", "VISUAL_TOKENIZER_ALIAS"]

VISUAL_TOKENIZER_ALIAS = Alias("tokenizer_path", "visual_tokenizer_path")
DTYPE_ALIAS = Alias("torch_dtype", "dtype")


@dataclass
class ModelArguments:
    """Where the UniMM model comes from and which of its parts are trained."""

    config_aliases = (VISUAL_TOKENIZER_ALIAS, DTYPE_ALIAS)

    llm_path: str | None = config_field(
        None, "Local directory of a Hugging Face causal LM (Qwen2/2.5/3, LLaMA) with its text tokenizer; extended "
        "with visual tokens. Ignored when model_path is set.")
    visual_tokenizer_path: str | None = config_field(
        None, "Local directory of a trained UniMM visual tokenizer (unimm.tokenizer.load_tokenizer); its "
        "codebook_spec sizes the visual tables, and it encodes images on the fly when no code cache covers them.")
    model_path: str | None = config_field(
        None, "Local directory of an existing UniMM model (output of pretrain/finetune/merge_lora) to continue from.")
    flat_codes: bool = config_field(
        False, "Single-codebook tokenizers only: add the codes to the text vocabulary so the LM head predicts them.")
    attn_implementation: str = config_field(
        "auto", "Attention kernel: auto (flash_attention_2 when available on GPU, else sdpa), sdpa, eager, "
        "flash_attention_2.")
    dtype: str = config_field(
        "auto", "Weight dtype when loading: auto (bfloat16 when --bf16, else float32), float32, bfloat16, float16.")
    train_llm: bool = config_field(True, "Train the LLM transformer body (and its full embedding tables).")
    train_new_embeddings: bool = config_field(
        True, "Train the embedding / LM-head rows added for visual tokens (only those rows when train_llm is false).")
    train_visual_heads: bool = config_field(True, "Train the visual code embeddings and depth heads.")
    train_projector: bool = config_field(
        True, "Train the projector from continuous visual features (VQRAE understanding) to the LLM width.")
    allow_visual_tokenizer_mismatch: bool = config_field(
        False, "Use visual_tokenizer_path even when its config or weights hash differs from the visual tokenizer "
        "the model was trained with (recorded in its config.json); warns instead of refusing.")
    vision_tower: str | None = config_field(
        None, "Local CLIP / SigLIP vision model folder (LLaVA-1.5's --vision_tower): its patch features feed the "
        "feature projector; a new model then needs no visual_tokenizer_path (no generation codes). For a model_path "
        "trained with a tower: a folder replacing the recorded one.")
    vision_select_layer: int = config_field(-2, "Hidden layer of the vision tower whose features are used (LLaVA's "
                                            "--mm_vision_select_layer; -2: the input of the last layer).")
    vision_select_feature: str = config_field("patch", "patch (CLIP's CLS token dropped) or cls_patch.")
    image_aspect: str | None = config_field(
        None, "Vision tower image handling: None or crop (the processor's own resize), pad (pad to a square of the "
        "mean colour first, LLaVA's --image_aspect_ratio pad).")
    projector_type: str = config_field("mlp2x_gelu", "Feature projector of a new model: mlp2x_gelu or linear.")
    pretrained_projector: str | None = config_field(
        None, "Projector weights to start from (LLaVA's mm_projector.bin, or a UniMM projector / model file).")
    save_mm_projector: bool = config_field(
        False, "Also write the projector alone, in LLaVA's mm_projector.bin layout, into output_dir and each "
        "checkpoint (LLaVA's --tune_mm_mlp_adapter stage 1 output).")
    quantization_bits: int | None = config_field(
        None, "Load the LLM quantized to 4 or 8 bits (QLoRA; needs a CUDA GPU and bitsandbytes).")
    quantization_double_quant: bool = config_field(True, "4-bit: quantize the quantization constants too.")
    quantization_type: str = config_field("nf4", "4-bit data type: nf4 or fp4.")

    def __post_init__(self) -> None:
        if self.model_path is None and (self.llm_path is None or (
                self.visual_tokenizer_path is None and self.vision_tower is None)):
            raise ValueError("set model_path (an existing UniMM model), or llm_path with visual_tokenizer_path "
                             "and/or vision_tower")
        if self.vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"vision_select_feature must be patch or cls_patch, got {self.vision_select_feature!r}")
        if self.image_aspect not in (None, "crop", "pad"):
            raise ValueError(f"image_aspect must be crop or pad, got {self.image_aspect!r}")
        if self.projector_type not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type must be mlp2x_gelu or linear, got {self.projector_type!r}")
        if self.quantization_bits not in (None, 4, 8):
            raise ValueError(f"quantization_bits must be 4 or 8, got {self.quantization_bits}")
        if self.quantization_type not in ("nf4", "fp4"):
            raise ValueError(f"quantization_type must be nf4 or fp4, got {self.quantization_type!r}")

    @property
    def torch_dtype(self) -> str:
        """The old name of `dtype`, read by code written before the rename."""
        return self.dtype

    @property
    def tower_aspect_ratio(self) -> str:
        """`VisionTower`'s image_aspect_ratio for `image_aspect`."""
        return "pad" if self.image_aspect == "pad" else "square"


@dataclass
class DataArguments(MixtureConfig, SampleConfig):
    """What the model trains on: the data layer's `MixtureConfig` and `SampleConfig`, plus collation. Their seeds
    are not options here: both derive from the training `seed` (`sample_config` / `mixture_config`)."""

    seed: int = field(default=0, init=False, repr=False)
    packing: bool = config_field(False, "Pack several samples per row (position_ids restart per sample).")
    data_seed_offset: int = config_field(0, "Added to the training seed for the mixture's sampling RNG.")

    def __post_init__(self) -> None:
        MixtureConfig.__post_init__(self)
        SampleConfig.__post_init__(self)

    def sample_config(self, seed: int) -> SampleConfig:
        return SampleConfig(**self._values(SampleConfig), seed=seed)

    def mixture_config(self, seed: int) -> MixtureConfig:
        """The mixture, its order seeded by the training seed plus `data_seed_offset`."""
        return MixtureConfig(**self._values(MixtureConfig), seed=seed + self.data_seed_offset)

    def _values(self, config_cls: type) -> dict[str, Any]:
        # This class inherits config_cls's fields, so every one of them is here under the same name.
        return {f.name: getattr(self, f.name) for f in fields(config_cls) if f.init and f.name != "seed"}


@dataclass
class LoraArguments:
    """LoRA (peft) wrapping for finetuning; the new token rows, visual heads and projector stay fully trainable."""

    use_lora: bool = config_field(False, "Wrap the LLM's linear layers with LoRA adapters (peft).")
    lora_r: int = config_field(16, "LoRA rank.")
    lora_alpha: int = config_field(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = config_field(0.05, "Dropout on the LoRA branch input.")
    lora_target_modules: str = config_field("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                            "Comma-separated names of LLM linear modules that get adapters.")
    lora_bias: str = config_field("none", "Biases trained with LoRA: none, all, lora_only (peft's bias).")
    lora_embeddings: str = config_field("new_rows", (
        "With train_new_embeddings: new_rows trains only the rows of the added tokens (peft trainable tokens; every "
        "text row stays bit-identical), full trains the whole embedding table and LM head (peft modules_to_save; a "
        "tied head stays tied). ZeRO-3 and FSDP2 always train full tables."))

    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]

    def __post_init__(self) -> None:
        if self.use_lora and (self.lora_r <= 0 or not self.target_modules()):
            raise ValueError("use_lora needs lora_r > 0 and at least one lora_target_modules entry")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        if self.lora_embeddings not in ("new_rows", "full"):
            raise ValueError(f"lora_embeddings must be new_rows or full, got {self.lora_embeddings!r}")


@dataclass
class UniMMTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with UniMM's defaults, throughput logging and modality grouping."""

    remove_unused_columns: bool = config_field(
        False, "Keep every collated key (visual_codes, image_features ...); UniMM batches are not plain text columns.")
    peak_tflops: float | None = config_field(
        None, "Peak TFLOP/s per device for the MFU estimate; default: the GPU's dense bf16 peak, or a measured matmul "
        "rate on CPU.")
    auto_resume: bool = config_field(
        True, "Resume from the latest checkpoint-* in output_dir when resume_from_checkpoint is not given.")
    save_final_model: bool = config_field(
        True, "Write the final model (HF format, ZeRO-3 weights gathered) to output_dir after training.")
    allow_resume_config_change: bool = config_field(
        False, "Resume a checkpoint whose run fingerprint (config, world size, DeepSpeed and LoRA configs) differs "
        "from this launch's, with a warning listing the differences (refused otherwise).")
    save_on_signal: bool = config_field(
        True, "On SIGTERM / SIGINT (or the launcher's exit) every rank stops at the next step, after saving a "
        "checkpoint.")
    group_by_modality_length: bool = config_field(
        False, "Batch samples of one task (caption, t2i, conversation, text) and similar length together "
        "(unimm.data.collator.GroupedBatchSampler); every device batch then holds one modality.")
    log_sample_ids: bool = config_field(
        False, "Append each step's sample ids to output_dir/sample_ids/rank<r>.jsonl (what every step trained on; a "
        "resumed run rewrites the steps after its checkpoint).")
    cpu_matmul_precision: str = config_field(
        "ieee", "Float32 matrix products on CPU: ieee (exact) or bf16 (bfloat16 inputs, float32 sums; the CPU "
        "counterpart of --tf32, faster on CPUs with AMX or AVX512-BF16; a CPU without them keeps ieee with a "
        "warning), for the training run only. No effect on CUDA.")
    # LLaVA's --mm_projector_lr
    projector_learning_rate: float | None = config_field(None, "The feature projector's own learning rate.")

    def __post_init__(self) -> None:
        # transformers' __post_init__ sets up the devices, which starts the process group; it runs in finalize().
        self._finalized = False
        check_cpu_matmul_precision(self.cpu_matmul_precision)

    def finalize(self) -> UniMMTrainingArguments:
        """Run transformers' own `__post_init__` (validation, device and process-group setup) once. Programs call
        it through `unimm.utils.runtime.prepare_training_arguments`, which first configures CPU launches."""
        if not self._finalized:
            super().__post_init__()
            self._finalized = True
        return self
