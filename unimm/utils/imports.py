"""The one place that decides whether optional packages are usable."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache


@lru_cache
def _is_available(module: str, distribution: str | None = None) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.metadata.version(distribution or module)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def is_deepspeed_available() -> bool:
    return _is_available("deepspeed")


def is_flash_attn_available() -> bool:
    """True when flash-attn is installed *and* imports (it fails to import without a matching CUDA build)."""
    if not _is_available("flash_attn", "flash-attn"):
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a CUDA symbol error from a mismatched build
        return False
    return True


def is_wandb_available() -> bool:
    return _is_available("wandb")


def is_tensorboard_available() -> bool:
    return _is_available("tensorboard")


def is_peft_available() -> bool:
    return _is_available("peft")


def is_skimage_available() -> bool:
    return _is_available("skimage", "scikit-image")


def is_torch_fidelity_available() -> bool:
    return _is_available("torch_fidelity", "torch-fidelity")


def is_vector_quantize_pytorch_available() -> bool:
    return _is_available("vector_quantize_pytorch", "vector-quantize-pytorch")


def require(available: bool, package: str, extra: str) -> None:
    """Raise a clear ImportError naming the pip extra that provides `package`."""
    if not available:
        raise ImportError(f"{package} is required for this feature: pip install 'unimm[{extra}]'")
