"""LLaVA-1.5 launch lines, translated onto UniMM's own options.

A researcher moving from haotian-liu/LLaVA keeps the argument list of `scripts/v1_5/pretrain.sh`, `finetune.sh`
or `finetune_lora.sh` and replaces only the paths: `scripts/pretrain.py` and `scripts/finetune.py` accept it.
`translate_llava_argv` rewrites those flags before the typed config is parsed, so the rest of UniMM only ever
sees UniMM options; each flag is either mapped (to a UniMM option with LLaVA's meaning), accepted as a no-op
(with the reason in a note), or refused with the reason. `LLAVA_FLAGS` is that table; the README's LLaVA table
is generated from it (`llava_flag_table`) and a test keeps the two equal.

Flags that are not LLaVA's pass through untouched, so a LLaVA line may be mixed with UniMM options.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unimm.utils.errors import UserError

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}

# LLaVA's `--version` (conversation template) values -> UniMM chat formats.
# LLaVA's `plain` is its stage-1 format (image, caption, newline: `llava_plain`), not UniMM's `plain`.
LLAVA_VERSIONS = {"v1": "v1", "vicuna_v1": "v1", "llava_llama_2": "llava_llama_2", "plain": "llava_plain",
                  "chat_template": "chat_template", "qwen": "chat_template"}


class LlavaFlagError(UserError, ValueError):
    """A LLaVA flag (or value) that UniMM refuses, with the reason."""


@dataclass(frozen=True)
class Translation:
    """The UniMM argument list, and one note per LLaVA flag that was mapped with a caveat or ignored."""

    argv: list[str]
    notes: list[str]
    llava_flags: list[str]


def _bool(flag: str, value: str | None) -> bool:
    if value is None:
        return True  # a bare `--flag`, as HfArgumentParser allows for booleans
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise LlavaFlagError(f"--{flag} takes True or False, got {value!r}")


def _local_dir(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        hint = " (it looks like a hub id: UniMM downloads nothing; download it first and pass its folder)" \
            if "/" in value and not path.exists() and not value.startswith((".", "/", "~")) else ""
        raise LlavaFlagError(f"--{flag} must be a local folder, got {value!r}{hint}")
    return path


def _config_kind(path: Path) -> str:
    """'unimm' (a UniMM model), 'visual_tokenizer' (a UniMM visual tokenizer), 'vision' (a CLIP / SigLIP vision
    tower) or 'llm' (anything else with a config.json), read from the folder's config.json."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LlavaFlagError(f"{path} holds no config.json: not a model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LlavaFlagError(f"{config_file}: invalid JSON ({err.msg})") from None
    model_type = str(config.get("model_type", ""))
    if model_type == "unimm":
        return "unimm"
    if model_type.startswith("unimm"):
        return "visual_tokenizer"
    if model_type in {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2",
                      "siglip2_vision_model"}:
        return "vision"
    return "llm"


# ---- one function per LLaVA flag that is more than a rename: (flag, value) -> (UniMM args, notes) ----------------

Rule = Callable[[str, "str | None"], "tuple[list[str], list[str]]"]


def _model_name_or_path(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    path = _local_dir(flag, value or "")
    if _config_kind(path) == "unimm":
        return ["--model_path", str(path)], []
    return ["--llm_path", str(path)], []


def _version(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if value not in LLAVA_VERSIONS:
        raise LlavaFlagError(f"--version {value!r} is not supported; UniMM has {sorted(LLAVA_VERSIONS)} "
                             "(LLaVA-1.5 trains with plain, then v1; Qwen models use chat_template)")
    return ["--chat_format", LLAVA_VERSIONS[value]], []


def _vision_tower(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    path = _local_dir(flag, value or "")
    kind = _config_kind(path)
    if kind == "vision":
        return ["--vision_tower", str(path)], []
    if kind == "visual_tokenizer":
        return ["--visual_tokenizer_path", str(path)], [
            f"--vision_tower {path} is a UniMM visual tokenizer: understanding uses its features (VQRAE) or codes "
            "(DualToken), generation its codes"]
    raise LlavaFlagError(f"--vision_tower {path} is neither a CLIP / SigLIP vision model nor a UniMM visual "
                         f"tokenizer (config.json model_type: {kind})")


def _projector_type(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if value not in ("linear", "mlp2x_gelu"):
        raise LlavaFlagError(f"--mm_projector_type {value!r} is not supported (UniMM has linear and mlp2x_gelu)")
    return ["--projector_type", value], []


def _select_feature(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if value not in ("patch", "cls_patch"):
        raise LlavaFlagError(f"--mm_vision_select_feature {value!r}: LLaVA's values are patch and cls_patch")
    return ["--vision_select_feature", value], []


def _im_start_end(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if _bool(flag, value):
        raise LlavaFlagError("--mm_use_im_start_end True is not supported: UniMM brackets every image with its own "
                             "image-start/end tokens, which the visual heads need; LLaVA-1.5 trains with False")
    return [], ["--mm_use_im_start_end False: UniMM still brackets each image with its image-start/end tokens "
                "(its layout needs them to place visual codes); nothing else changes"]


def _im_patch_token(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if _bool(flag, value):
        raise LlavaFlagError("--mm_use_im_patch_token True is not supported: it adds LLaVA-1.0's <im_patch> token, "
                             "which LLaVA-1.5 does not use; pass False")
    return [], []


def _aspect(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    # LLaVA's 'square' is its image processor's default: resize the short side, then centre-crop.
    aspects = {"pad": "pad", "square": "crop"}
    if value not in aspects:
        raise LlavaFlagError(f"--image_aspect_ratio {value!r} is not supported (UniMM has pad and square; "
                             "LLaVA-NeXT's anyres is not available)")
    return ["--image_aspect", aspects[value]], []


def _tune_adapter(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if not _bool(flag, value):
        return [], []
    return ["--train_llm", "false", "--train_new_embeddings", "false", "--train_visual_heads", "false",
            "--train_projector", "true", "--save_mm_projector", "true"], []


def _freeze_backbone(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    return (["--train_llm", "false"], []) if _bool(flag, value) else ([], [])


def _freeze_adapter(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    return ["--train_projector", "false" if _bool(flag, value) else "true"], []


def _lora_enable(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    return ["--use_lora", "true" if _bool(flag, value) else "false"], []


def _lora_weight_path(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if value:
        raise LlavaFlagError("--lora_weight_path is not supported (LLaVA's own training ignores it too); resume "
                             "a LoRA run from its checkpoint with --resume_from_checkpoint")
    return [], []


def _bits(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if value == "16":
        return [], []
    if value in ("4", "8"):
        return ["--quantization_bits", value], []
    raise LlavaFlagError(f"--bits {value!r}: LLaVA's values are 4, 8 and 16")


def _tf32(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    if _has_cuda():
        return ["--tf32", "true" if _bool(flag, value) else "false"], []
    return [], ["--tf32: ignored, there is no CUDA device (TF32 is an NVIDIA Ampere+ math mode)"]


def _report_to(flag: str, value: str | None) -> tuple[list[str], list[str]]:
    import importlib.util

    targets = [t.strip() for t in (value or "").split(",") if t.strip()]
    missing = [t for t in targets if t not in ("none", "all") and importlib.util.find_spec(t) is None]
    kept = [t for t in targets if t not in missing] or ["none"]
    notes = [f"--report_to {t}: not installed here, so not reported to (pip install {t} to keep it)"
             for t in missing]
    return ["--report_to", ",".join(kept)], notes


def _noop(reason: str) -> Rule:
    def rule(flag: str, value: str | None) -> tuple[list[str], list[str]]:
        return [], [f"--{flag}: accepted, no effect ({reason})"]
    return rule


def _rename(target: str) -> Rule:
    def rule(flag: str, value: str | None) -> tuple[list[str], list[str]]:
        return [f"--{target}"] + ([] if value is None else [value]), []
    return rule


def _refuse(reason: str) -> Rule:
    def rule(flag: str, value: str | None) -> tuple[list[str], list[str]]:
        raise LlavaFlagError(f"--{flag} is not supported: {reason}")
    return rule


@dataclass(frozen=True)
class LlavaFlag:
    """One LLaVA flag: how UniMM treats it ('mapped', 'alias' or 'no-op'; 'refused' for some values), the UniMM
    option it becomes, and the rule that translates it."""

    name: str
    treatment: str
    unimm: str
    rule: Rule
    boolean: bool = False  # may be given bare (`--lora_enable`), as HfArgumentParser allows for booleans


# LLaVA flags that are UniMM options under another name: LLaVA name -> (UniMM option, note for the table).
_ALIASES: dict[str, tuple[str, str]] = {
    "data_path": ("conversation_json", ""),
    "image_folder": ("image_folder", ""),
    "model_max_length": ("max_length", ""),
    "mm_vision_select_layer": ("vision_select_layer", ""),
    "pretrain_mm_mlp_adapter": ("pretrained_projector", "LLaVA's `mm_projector.bin` or a UniMM projector file"),
    "mm_projector_lr": ("projector_learning_rate", "its own parameter group"),
    "group_by_modality_length": ("group_by_modality_length", "batches of one modality and similar length"),
    "lora_r": ("lora_r", ""),
    "lora_alpha": ("lora_alpha", ""),
    "lora_dropout": ("lora_dropout", ""),
    "lora_bias": ("lora_bias", "none, all, lora_only"),
    "double_quant": ("quantization_double_quant", "with `--bits 4`"),
    "quant_type": ("quantization_type", "nf4, fp4; with `--bits 4`"),
    "evaluation_strategy": ("eval_strategy", "its name since transformers 4.41"),
    "warmup_ratio": ("warmup_steps", "as a fraction: transformers 5 reads a value below 1 as a ratio"),
}
_BOOLEAN_ALIASES = {"group_by_modality_length", "double_quant"}

_MAPPED: tuple[LlavaFlag, ...] = (
    LlavaFlag("model_name_or_path", "mapped", "`--llm_path` (an LLM folder) or `--model_path` (a UniMM model); "
              "a hub id is refused: nothing is downloaded", _model_name_or_path),
    LlavaFlag("version", "mapped", "`--chat_format`: `v1`, `llava_llama_2`, `plain` (as `llava_plain`), `chat_template` (Qwen); "
              "other values refused", _version),
    LlavaFlag("vision_tower", "mapped", "`--vision_tower` (a local CLIP / SigLIP vision model) or "
              "`--visual_tokenizer_path` (a UniMM visual tokenizer)", _vision_tower),
    LlavaFlag("mm_vision_select_feature", "mapped", "`--vision_select_feature` (patch, cls_patch)",
              _select_feature),
    LlavaFlag("mm_projector_type", "mapped", "`--projector_type` (linear, mlp2x_gelu)", _projector_type),
    LlavaFlag("tune_mm_mlp_adapter", "mapped", "train only the projector (`--train_llm false ... "
              "--train_projector true`) and write LLaVA's `mm_projector.bin` (`--save_mm_projector`)",
              _tune_adapter, boolean=True),
    LlavaFlag("freeze_backbone", "mapped", "`--train_llm false`", _freeze_backbone, boolean=True),
    LlavaFlag("freeze_mm_mlp_adapter", "mapped", "`--train_projector false`", _freeze_adapter, boolean=True),
    LlavaFlag("mm_use_im_start_end", "mapped", "False: accepted (UniMM keeps its own image-start/end tokens); "
              "True: refused", _im_start_end, boolean=True),
    LlavaFlag("mm_use_im_patch_token", "mapped", "False: accepted; True (LLaVA-1.0's `<im_patch>`): refused",
              _im_patch_token, boolean=True),
    LlavaFlag("image_aspect_ratio", "mapped", "`--image_aspect`: pad -> pad (to a square of the mean colour), "
              "square -> crop (short side resize + centre crop); anyres refused", _aspect),
    LlavaFlag("lora_enable", "mapped", "`--use_lora`", _lora_enable, boolean=True),
    LlavaFlag("lora_weight_path", "mapped", "empty: accepted; a path: refused (resume with "
              "`--resume_from_checkpoint`)", _lora_weight_path),
    LlavaFlag("bits", "mapped", "16: default; 4 / 8: `--quantization_bits` (QLoRA with bitsandbytes, GPU only)",
              _bits),
    LlavaFlag("tf32", "mapped", "passed on with a CUDA device; ignored, with a note, without one", _tf32,
              boolean=True),
    LlavaFlag("report_to", "mapped", "passed on; a logger that is not installed is dropped, with a note",
              _report_to),
    LlavaFlag("mm_patch_merge_type", "no-op", "flat is UniMM's only image layout",
              _noop("flat is UniMM's only image layout")),
    LlavaFlag("lazy_preprocess", "no-op", "UniMM always tokenises each sample when it is drawn",
              _noop("UniMM always tokenises each sample when it is drawn"), boolean=True),
    LlavaFlag("mpt_attn_impl", "no-op", "MPT models are not supported; attention is `--attn_implementation`",
              _noop("attention is chosen by --attn_implementation")),
    LlavaFlag("cache_dir", "refused", "nothing is downloaded", _refuse("UniMM downloads nothing; pass local folders")),
)
LLAVA_FLAGS: tuple[LlavaFlag, ...] = _MAPPED + tuple(
    LlavaFlag(name, "alias", f"`--{target}`" + (f" ({note})" if note else ""), _rename(target),
              boolean=name in _BOOLEAN_ALIASES)
    for name, (target, note) in _ALIASES.items())
_BY_NAME = {flag.name: flag for flag in LLAVA_FLAGS}


def _split(arg: str) -> tuple[str, str | None]:
    name, sep, value = arg[2:].partition("=")
    return name, (value if sep else None)


def translate_llava_argv(argv: Sequence[str]) -> Translation:
    """Rewrite LLaVA-1.5 flags in `argv` into UniMM options (see the module docstring); others pass through."""
    out: list[str] = []
    notes: list[str] = []
    seen: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, value = _split(arg) if arg.startswith("--") else ("", None)
        flag = _BY_NAME.get(name)
        if flag is None:
            out.append(arg)
            i += 1
            continue
        if value is None and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        if value is None and not flag.boolean:
            raise LlavaFlagError(f"--{name} needs a value")
        mapped, flag_notes = flag.rule(name, value)
        out.extend(mapped)
        notes.extend(flag_notes)
        seen.append(name)
        i += 1
    if seen and not any(arg == "--use_cpu" or arg.startswith("--use_cpu=") for arg in out) and not _has_cuda():
        # transformers refuses --bf16 (LLaVA's scripts all pass it) on a machine without CUDA unless use_cpu is set
        out += ["--use_cpu", "true"]
        notes.append("no CUDA device: training on CPU (--use_cpu true added)")
    return Translation(argv=out, notes=notes, llava_flags=seen)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_WEIGHTS = ("caption_weight", "t2i_weight", "conversation_weight", "text_weight")
_OTHER_SOURCES = ("code_cache", "text_data")


def _option_names(argv: Sequence[str]) -> set[str]:
    return {_split(arg)[0] for arg in argv if arg.startswith("--")}


def conversation_only_weights(translation: Translation, original_argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A LLaVA line trains on its `--data_path` only: when it gave one, and neither the command line nor a YAML file
    sets a mixture weight or another data source, the mixture becomes conversations only (the programs' own
    defaults mix caption and text-to-image samples from a code cache). Returns (extra arguments, notes)."""
    from unimm.utils.config import config_origins

    if "data_path" not in translation.llava_flags:
        return [], []
    given = _option_names(translation.argv) | set(config_origins(list(original_argv)))
    if given & set(_WEIGHTS + _OTHER_SOURCES):
        return [], []
    extra = ["--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--text_weight", "0"]
    return extra, ["--data_path without mixture weights: training on its conversations only "
                   "(--conversation_weight 1, the caption, t2i and text weights 0)"]


def _is_rank_zero() -> bool:
    import os

    # parsing happens before the process group exists: the launcher's environment says which process this is
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def translate_training_argv(argv: Sequence[str]) -> list[str]:
    """What `unimm-pretrain` and `unimm-finetune` parse: `argv` with LLaVA-1.5 flags translated (and the mixture
    made conversation-only for a bare `--data_path`, see `conversation_only_weights`); each note is printed once,
    by rank 0, on stderr. A refused flag raises `LlavaFlagError`, reported by `run_main` in one line."""
    import sys

    if any(arg in ("-h", "--help") for arg in argv):
        return list(argv)
    translation = translate_llava_argv(argv)
    extra, notes = conversation_only_weights(translation, argv)
    if _is_rank_zero():
        for note in dict.fromkeys(translation.notes + notes):
            print(f"note: {note}", file=sys.stderr)
    return translation.argv + extra


LLAVA_HELP = ("LLaVA-1.5 launch flags (scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh) are accepted and "
              "translated onto these options, e.g. --model_name_or_path, --version, --data_path, --vision_tower, "
              "--pretrain_mm_mlp_adapter, --tune_mm_mlp_adapter, --lora_enable, --mm_projector_lr; the table of every "
              "flag is unimm.cli.llava.llava_flag_table() (README, 'Coming from LLaVA').")


def llava_flag_table() -> str:
    """The README's table of LLaVA flags, generated from `LLAVA_FLAGS`."""
    rows = ["| LLaVA flag | treatment | in UniMM |", "| --- | --- | --- |"]
    rows += [f"| `--{flag.name}` | {flag.treatment} | {flag.unimm} |" for flag in LLAVA_FLAGS]
    return "\n".join(rows)
