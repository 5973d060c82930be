"""The tokenizer trainer's configs: model, data and training arguments, read by `unimm.utils.config.parse_config`.

The training options use the Hugging Face Trainer names of the LLM programs (`per_device_train_batch_size`, `bf16`,
`resume_from_checkpoint`, `auto_resume`). The names this trainer used before (`batch_size`, `mixed_precision`,
`resume`) are deprecated aliases (`unimm.utils.config.Alias`): still accepted in YAML and on the command line,
with one warning per old name. `mixed_precision: auto` leaves `bf16` unset (bf16 where CUDA supports it); `resume:
auto` is `auto_resume: true`, a folder is `resume_from_checkpoint`. Unlike the LLM programs, `auto_resume` is off
by default: a tokenizer run in a used output_dir starts over unless asked to resume, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import yaml

from unimm.tokenizer.configuration import DualTokenConfig, VQRAEConfig
from unimm.tokenizer.losses import ReconstructionLossConfig
from unimm.utils.config import Alias, config_field


def _config_fields(config_cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(config_cls) if f.name != "encoder_config")


_OVERRIDES_HELP = (
    "Tokenizer config fields set over the preset's or the saved model's: a YAML mapping, or on the command line a "
    f"JSON/YAML mapping string. VQRAE fields: {_config_fields(VQRAEConfig)}. DualToken fields: "
    f"{_config_fields(DualTokenConfig)}. Tiny presets also take encoder_type, patch_size, encoder_hidden_size, "
    "encoder_num_layers, encoder_num_heads, encoder_use_head. Named shapes are presets (unimm.tokenizer.PRESETS)."
)


def parse_overrides(value: dict | str | None) -> dict[str, Any]:
    """`model_overrides` as a mapping: a YAML mapping stays as it is, a command-line string is read as YAML (JSON
    is YAML). The keys are checked against the tokenizer config by `build_tokenizer` / `load_tokenizer`."""
    if value is None or value == "":
        return {}
    parsed = yaml.safe_load(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError(f"model_overrides must be a mapping of tokenizer config fields, got {value!r}")
    return dict(parsed)


@dataclass
class TokenizerModelArguments:
    preset: str | None = config_field(
        None,
        "build_tokenizer preset (vqrae-tiny, dualtoken-tiny, vqrae-siglip2-so400m-256, ...; unimm.tokenizer.PRESETS).",
    )
    model_path: str | None = config_field(
        None, "Start from a saved tokenizer (load_tokenizer), e.g. stage 1 output for stage 2."
    )
    encoder_path: str | None = config_field(None, "Local path of the pretrained vision encoder.")
    model_overrides: Union[dict, str, None] = config_field(None, _OVERRIDES_HELP)
    stage: int = config_field(
        1,
        "VQRAE stage: 1 = encoder frozen, 2 = encoder trained + distillation. DualToken stage (the reference's): "
        "0 = encoder trained above semantic_layer only, 1 = all, 2 = semantic path only (pixel branch frozen).",
    )
    teacher_path: str | None = config_field(
        None,
        "Local HF checkpoint of the encoder a DualToken with train_encoder takes its semantic targets from (the "
        "pretrained SigLIP, for stages that continue from a saved tokenizer); default: a copy of the encoder as "
        "loaded.",
    )
    decoder_only: bool = config_field(False, "Train only the decoder (clean l-DeTok finetune; set denoising off).")

    def __post_init__(self) -> None:
        self.model_overrides = parse_overrides(self.model_overrides)
        if self.stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {self.stage}")


@dataclass
class ImageSourceArguments:
    """Where a tokenizer's images come from and how bad ones are treated: the options the trainer
    (`TokenizerDataArguments`) and the evaluation (`unimm.inference.tokenizer_eval.TokenizerEvalArguments`) share,
    read by `unimm.train.tokenizer.data.load_records`."""

    dataset: str | None = config_field(
        None, "Image folder, jsonl/json/parquet, save_to_disk dir, tar shards, or sample_photos/shapes."
    )
    image_key: str = config_field("image", "Column/key holding the image (path, bytes or image).")
    split: str = config_field("train", "Split to read from multi-split sources.")
    image_size: int | None = config_field(None, "Size of the shortcut datasets' images before the model's transform.")
    num_samples: int = config_field(256, "Number of images of the `shapes` shortcut.")
    allow_outside_image_folder: bool = config_field(
        False, "Let record image paths leave their folder (absolute, `..`, symlinks); off: skipped."
    )
    max_bad_fraction: float = config_field(
        0.01, "Stop with an error once more than this fraction of images is unreadable."
    )


@dataclass
class TokenizerDataArguments(ImageSourceArguments):
    """The trainer's data: the image source (`ImageSourceArguments`), its evaluation set and loader options."""

    eval_dataset: str | None = config_field(None, "Evaluation images (default: the training set).")
    bad_sample_min_seen: int = config_field(
        100, "Images seen before max_bad_fraction is enforced (always checked at the end)."
    )
    num_workers: int = config_field(0, "DataLoader worker processes.")
    eval_max_images: int | None = config_field(256, "Cap on evaluation images (None = all).")
    reference_encoder: str | None = config_field(
        None,
        "Local HF checkpoint of the initial (pretrained) encoder: the periodic evaluation then reports semantic "
        "preservation against it (a DualToken with train_encoder needs none).",
    )


_MIXED_PRECISION_TO_FLAGS = {"auto": (None, False), "bf16": (True, False), "fp16": (False, True), "no": (False, False)}


def _mixed_precision_flags(value: str) -> dict[str, Any]:
    """The deprecated `mixed_precision` value as the Trainer's switches (auto: bf16 left unset)."""
    if value not in _MIXED_PRECISION_TO_FLAGS:
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {value!r}")
    bf16, fp16 = _MIXED_PRECISION_TO_FLAGS[value]
    return {"bf16": bf16, "fp16": fp16}


def _resume_options(value: str | None) -> dict[str, Any]:
    """The deprecated `resume`: 'auto' -> auto_resume, a folder -> resume_from_checkpoint."""
    if not value:
        return {}
    return {"auto_resume": True} if value == "auto" else {"resume_from_checkpoint": value}


# The fields this trainer shares with `transformers.TrainingArguments` (the LLM programs' arguments): their names,
# types and help texts are taken from transformers' own field definitions, so a flag means here what it means there
# and a rename upstream fails at import. A row gives the default this trainer keeps (its own, unchanged), a narrower
# type where the loop takes whole steps only (transformers also takes a float < 1 as a ratio of the total steps), and
# a help text only where transformers' would mislead here.
# (name, default, narrower type or None, help or None)
_SHARED_FIELDS: tuple[tuple[str, Any, Any, str | None], ...] = (
    ("output_dir", None, None, "Run directory (config, checkpoints, samples, model)."),
    ("seed", 0, None, "Random seed (model init, data order, denoising noise)."),
    ("max_steps", 1000, None, "Total optimisation steps (this trainer counts steps, not epochs)."),
    ("per_device_train_batch_size", 8, None, None),
    ("learning_rate", 1e-4, None, "Peak LR of decoder, quantizer and projections."),
    ("weight_decay", 0.05, None,
     "AdamW weight decay of the weight matrices; vectors (biases, norms), SimVQ's codebook projection W and "
     "positional tables get none (unimm.tokenizer.param_groups)."),
    ("adam_beta1", 0.9, None, None),
    ("adam_beta2", 0.95, None, None),
    ("warmup_steps", 0, int, "Linear warm-up steps."),
    ("max_grad_norm", 1.0, None, None),
    ("bf16", None, Optional[bool], "bf16 autocast; unset: on where CUDA supports bf16, off elsewhere."),
    ("fp16", False, None, None),
    ("gradient_checkpointing", False, bool,
     "Recompute the encoder's and the decoder's layer activations in backward instead of keeping them "
     "(`gradient_checkpointing_enable()`): less memory for about one more forward pass of those layers."),
    ("logging_steps", 10, int, "Log losses and batch metrics every N steps."),
    ("eval_steps", 0, int, "Evaluate every N steps (0 = only at start and end)."),
    ("save_steps", 1000, int, "Checkpoint every N steps (0 = only at the end)."),
    ("save_total_limit", 2, None, "Keep only the newest N checkpoints."),
    ("resume_from_checkpoint", None, None, "A checkpoint-<step> folder to resume from (it must be complete)."),
)


def _shared_field(name: str, default: Any, narrower: Any, help_text: str | None) -> tuple[str, Any, Any]:
    """`(name, type, field)` for `dataclasses.make_dataclass`: the `TrainingArguments` field `name`, with this
    trainer's default (and type or help where the row gives one)."""
    from transformers import TrainingArguments

    source = next((f for f in dataclasses.fields(TrainingArguments) if f.name == name), None)
    if source is None:
        raise TypeError(f"transformers.TrainingArguments has no field {name!r}; update _SHARED_FIELDS")
    return name, narrower or source.type, config_field(default, help_text or source.metadata.get("help", ""))


# The base class of `TokenizerTrainingArguments`: the shared fields, built from the rows above.
SharedTrainingArguments = dataclasses.make_dataclass(
    "SharedTrainingArguments", [_shared_field(*row) for row in _SHARED_FIELDS])
SharedTrainingArguments.__module__ = __name__
SharedTrainingArguments.__doc__ = "The `transformers.TrainingArguments` fields the tokenizer trainer reads."


@dataclass
class TokenizerTrainingArguments(SharedTrainingArguments):
    """The tokenizer trainer's options: the `TrainingArguments` fields it shares (`SharedTrainingArguments`), then
    its own (separate learning rates of encoder and discriminator, EMA, sample grids, resume switches)."""

    eval_batch_size: int = config_field(16, "Images per device per evaluation batch.")
    encoder_learning_rate: float = config_field(
        1e-5, "Peak LR of the encoder when it is trained (VQRAE stage 2, DualToken); 0 freezes it."
    )
    disc_learning_rate: float = config_field(1e-4, "Peak LR of the discriminator.")
    disc_warmup_steps: int | None = config_field(
        None, "Warm-up steps of the discriminator's schedule (from gan_start_step); None = warmup_steps."
    )
    disc_min_lr_ratio: float | None = config_field(
        None, "Cosine floor of the discriminator's schedule as a fraction of its peak LR; None = min_lr_ratio."
    )
    min_lr_ratio: float = config_field(0.0, "Cosine schedule floor as a fraction of the peak LR.")
    ema_decay: float = config_field(0.0, "EMA decay of the weights (0 disables EMA).")
    sample_steps: int = config_field(500, "Write an input|reconstruction PNG grid every N steps (0 = off).")
    num_sample_images: int = config_field(8, "Images in each sample grid.")
    auto_resume: bool = config_field(
        False,
        "Resume from the newest complete checkpoint-* in output_dir when resume_from_checkpoint is not given (none "
        "there: start fresh).",
    )
    allow_resume_config_change: bool = config_field(
        False, "Resume a checkpoint whose run fingerprint (config, world size) differs from this launch's, with a "
        "warning listing the differences (refused otherwise)."
    )
    stop_after_step: int = config_field(
        0, "End this run after this step (checkpointed) though the schedule runs to max_steps."
    )
    progress_bar: bool = config_field(True, "Show a tqdm progress bar.")
    config_aliases: ClassVar[tuple[Alias, ...]] = (
        Alias("batch_size", "per_device_train_batch_size"),
        Alias("mixed_precision", "bf16", convert=_mixed_precision_flags),
        Alias("resume", "resume_from_checkpoint", convert=_resume_options),
    )

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one")

    @property
    def mixed_precision_choice(self) -> str:
        """'auto' (bf16 where supported), 'bf16', 'fp16' or 'no': what `unimm.utils.runtime` resolves."""
        if self.fp16:
            return "fp16"
        return "auto" if self.bf16 is None else ("bf16" if self.bf16 else "no")


CONFIG_TYPES = (TokenizerModelArguments, TokenizerDataArguments, ReconstructionLossConfig, TokenizerTrainingArguments)
