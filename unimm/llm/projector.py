"""The feature projector on its own file, as LLaVA's two stages pass it: stage 1 (`--tune_mm_mlp_adapter`) trains
only the projector and writes `mm_projector.bin`; stage 2 starts from it (`--pretrain_mm_mlp_adapter`).

Two key layouts are read, one chosen when writing:
- LLaVA's (`save_mm_projector`'s default): a `torch.save` dict keyed `model.mm_projector.0.weight`, `.0.bias`,
  `.2.weight`, `.2.bias` for `mlp2x_gelu` (LLaVA's `nn.Sequential(Linear, GELU, Linear)`), or
  `model.mm_projector.weight`, `.bias` for `linear`. On reading, any prefix before `mm_projector.` is accepted and
  other keys (LLaVA also stores `embed_tokens` there with `--mm_use_im_start_end`) are ignored, as LLaVA's loader
  does.
- UniMM's: the state-dict keys of `FeatureProjector` (`linear_1.weight` ...), as safetensors (written with
  `layout="unimm"`) or a torch file; keys prefixed `feature_projector.` are taken from a whole UniMM model file
  (`model.safetensors`), and `multi_modal_projector.` from transformers' LLaVA port (llava-hf checkpoints), which
  names its modules as UniMM does.

ZeRO-3 / FSDP2: both functions gather partitioned projector parameters (every rank must call them); only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from unimm.llm.embedding import FeatureProjector
from unimm.utils.distributed import is_main_process
from unimm.utils.errors import UserError
from unimm.utils.parallel import full_shape, full_state_dict, gathered

logger = logging.getLogger(__name__)

__all__ = ["LLAVA_PROJECTOR_FILE", "ProjectorFileError", "load_mm_projector", "save_mm_projector"]

LLAVA_PROJECTOR_FILE = "mm_projector.bin"
LLAVA_PREFIX = "model.mm_projector."
_LLAVA_KEYWORD = "mm_projector."
# whole-model files whose projector has UniMM's module names: UniMM's own, and transformers'
# LlavaForConditionalGeneration (llava-hf checkpoints: `multi_modal_projector.linear_1` ...)
_NAMED_KEYWORDS = ("feature_projector.", "multi_modal_projector.")
# UniMM module name -> LLaVA's index in its nn.Sequential ("" for `linear`, a bare nn.Linear)
_LLAVA_MODULES = {"mlp2x_gelu": {"linear_1": "0.", "linear_2": "2."}, "linear": {"linear_1": ""}}


class ProjectorFileError(UserError, ValueError):
    """A projector file that cannot be read into the model's projector; the message names the file and key."""


def _projector(model: nn.Module) -> FeatureProjector:
    projector = model if isinstance(model, FeatureProjector) else getattr(model, "feature_projector", None)
    if projector is None:
        raise ValueError("the model has no feature projector (build it with feature_dim, e.g. from a vision tower's "
                         "model_config_kwargs())")
    if not isinstance(projector, FeatureProjector):
        raise TypeError(f"model.feature_projector is a {type(projector).__name__}, not a FeatureProjector (a peft "
                        f"wrapper?); save or load the projector before wrapping the model, or pass the base model")
    return projector


def _llava_key(name: str, projector_type: str) -> str:
    module, leaf = name.split(".", 1)
    return LLAVA_PREFIX + _LLAVA_MODULES[projector_type][module] + leaf


def save_mm_projector(model: nn.Module, path: str | os.PathLike, layout: str = "llava") -> Path:
    """Write the feature projector of `model` to `path` (LLaVA writes `<output_dir>/mm_projector.bin`):
    `layout="llava"` in LLaVA's key layout (torch.save), `layout="unimm"` as safetensors with the projector's own
    keys. Tensors keep the projector's dtype. Returns the path."""
    if layout not in ("llava", "unimm"):
        raise ValueError(f"layout must be 'llava' or 'unimm', got {layout!r}")
    projector = _projector(model)
    path = Path(path)
    state = full_state_dict(projector)  # every rank: partitioned weights (ZeRO-3, FSDP2) are gathered
    if not is_main_process():
        return path
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "llava":
        torch.save({_llava_key(name, projector.projector_type): t for name, t in state.items()}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", "unimm_projector_type": projector.projector_type})
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file, reported as one
        raise ProjectorFileError(f"{path}: not a readable projector file (torch or safetensors): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProjectorFileError(f"{path}: holds a {type(state).__name__}, not a dict of tensors (a state dict)")
    return state


def _llava_projector_type(keys: set[str]) -> str:
    """The LLaVA projector type a set of keys (after `mm_projector.`) comes from, for error messages."""
    indices = {key.split(".")[0] for key in keys if "." in key}
    if keys <= {"weight", "bias"}:
        return "linear"
    if indices and all(i.isdigit() for i in indices):
        return f"mlp{len(indices)}x_gelu"
    return "unknown"


@torch.no_grad()
def load_mm_projector(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a projector saved by `save_mm_projector` (either layout), by LLaVA's stage 1 (`mm_projector.bin`), or
    the projector inside a whole UniMM or llava-hf model file, into `model`'s feature projector. Every projector key
    must be present with the model's shape; the error names the file, the key and both shapes. Returns the keys of
    the file that were ignored (not the projector's)."""
    projector = _projector(model)
    path = Path(path)
    if path.is_dir():
        raise ProjectorFileError(f"{path} is a folder; pass the projector file itself "
                                 f"(e.g. {path / LLAVA_PROJECTOR_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"projector file not found: {path}")
    state = _read_tensors(path)
    projector_type = projector.projector_type
    # UniMM name -> shape (the whole shape of a partitioned parameter)
    expected = {name: full_shape(p) for name, p in projector.named_parameters()}
    if any(_LLAVA_KEYWORD in key for key in state):
        # LLaVA's loader: keys after the first "mm_projector."; file names are reported as written in the file
        found = {key.split(_LLAVA_KEYWORD, 1)[1]: key for key in state if _LLAVA_KEYWORD in key}
        wanted = {_llava_key(name, projector_type)[len(LLAVA_PREFIX):]: name for name in expected}
        file_type = _llava_projector_type(set(found))
        layout = "LLaVA"
    else:
        # UniMM's names, alone or inside a whole model file (UniMM's, or transformers' LLaVA port)
        keyword = next((k for k in _NAMED_KEYWORDS if any(k in key for key in state)), None)
        found = ({key.split(keyword, 1)[1]: key for key in state if keyword in key} if keyword
                 else {key: key for key in state})
        wanted = {name: name for name in expected}
        file_type = "linear" if set(found) <= {"linear_1.weight", "linear_1.bias"} else "mlp2x_gelu"
        layout = "UniMM"
    ignored = sorted(set(state) - set(found.values()))
    missing = [key for key in wanted if key not in found]
    unexpected = [found[key] for key in found if key not in wanted]
    if missing or unexpected:
        what = f"lacks {[LLAVA_PREFIX + k if layout == 'LLaVA' else k for k in missing]}" if missing else ""
        if unexpected:
            what += (" and " if what else "") + f"has {unexpected}, which the model's projector does not"
        raise ProjectorFileError(f"{path}: a {layout}-layout projector file that {what}; the model's projector is "
                                 f"{projector_type!r}, the file's looks like {file_type!r} "
                                 f"(UniMMConfig.feature_projector_type / --mm_projector_type)")
    state_dict = {}
    for key, name in wanted.items():
        tensor, shape = state[found[key]], expected[name]
        if tuple(tensor.shape) != shape:
            sizes = f"feature_dim {projector.linear_1.in_features} -> hidden {projector.linear_1.out_features}"
            raise ProjectorFileError(f"{path}: {found[key]} has shape {list(tensor.shape)}, but the model's projector "
                                     f"expects {list(shape)} ({name}; {sizes}): a projector for another "
                                     f"vision tower or LLM?")
        state_dict[name] = tensor
    with gathered(projector.parameters(), modifier_rank=0):  # under ZeRO-3, rank 0's values are kept
        projector.load_state_dict(state_dict, strict=True)
    if ignored:
        logger.info("%s: ignored %d keys that are not the projector's: %s", path, len(ignored), ignored[:8])
    return ignored
