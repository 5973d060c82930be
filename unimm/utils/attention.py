"""The one place that chooses the attention implementation for every model UniMM builds."""

from __future__ import annotations

import torch

from unimm.utils.imports import is_flash_attn_available

_VALID = ("eager", "sdpa", "flash_attention_2")


def select_attn_implementation(requested: str | None = None, dtype: torch.dtype | None = None) -> str:
    """`flash_attention_2` when flash-attn imports, a CUDA GPU is present and the dtype is half precision;
    otherwise `sdpa`. An explicit `requested` value (e.g. from a config) wins, after validation."""
    if requested not in (None, "auto"):
        if requested not in _VALID:
            raise ValueError(f"attn_implementation must be one of {_VALID} or 'auto', got {requested!r}")
        if requested == "flash_attention_2" and not is_flash_attn_available():
            raise ImportError("attn_implementation='flash_attention_2' needs flash-attn: pip install 'unimm[flash]'")
        return requested
    half = dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and is_flash_attn_available():
        return "flash_attention_2"
    return "sdpa"
