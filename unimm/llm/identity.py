"""Which visual tokenizer a UniMM model was trained with, recorded in its config and checked when the two are
loaded together.

The codebook spec alone does not tell tokenizers apart: VQRAE stage 1 and stage 2 share it (and their whole config,
the stage being a training switch), but stage 2 has trained its encoder, so the same image gets other codes. The
identity therefore holds the tokenizer's config hash and a hash of its weights, the same two values a code cache
records (`unimm.tokenizer.identity.TokenizerIdentity`), plus the folder it was loaded from, for the error message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from unimm.tokenizer.identity import TokenizerIdentity  # the code cache's identity: one definition of both hashes
from unimm.utils.errors import UserError
from unimm.utils.logging import warn_once

logger = logging.getLogger(__name__)

IDENTITY_KEYS = ("config_hash", "weights_hash")  # what must agree; `path` and `model_type` only explain


class VisualTokenizerMismatchError(UserError, ValueError):
    """The visual tokenizer given is not the one the model was trained with."""


def _source_path(visual_tokenizer: Any) -> str | None:
    name = str(getattr(visual_tokenizer, "name_or_path", "") or "")
    if not name:
        return None
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def visual_tokenizer_identity(visual_tokenizer: Any) -> dict[str, str | None]:
    """`{"model_type", "config_hash", "weights_hash", "path"}` of a UniMM visual tokenizer (VQRAE, DualToken).

    config_hash:  sha256 of the canonical JSON of its architecture config (`config_hash()`; training-only options
                  such as denoising or the learning stage are left out);
    weights_hash: xxh3-128 of its state dict (`unimm.tokenizer.identity.tokenizer_weights_hash`), so two tokenizers
                  with one config but other weights differ. Hash before casting the tokenizer to another dtype;
    path:         the absolute folder it was loaded from, None for a tokenizer built in memory.
    """
    identity = TokenizerIdentity.of(visual_tokenizer)
    return {"model_type": getattr(visual_tokenizer.config, "model_type", None),
            "config_hash": identity.config_hash, "weights_hash": identity.weights_hash,
            "path": _source_path(visual_tokenizer)}


def _describe(identity: dict) -> str:
    return (f"{identity.get('path') or '<built in memory>'} (config hash {str(identity.get('config_hash'))[:16]}, "
            f"weights hash {identity.get('weights_hash')})")


def check_visual_tokenizer(model_config: Any, visual_tokenizer: Any, allow_mismatch: bool = False) -> dict:
    """Raise `VisualTokenizerMismatchError`, naming both tokenizers' hashes and paths, unless `visual_tokenizer`
    is the one recorded in `model_config` (a `UniMMConfig`) when the model was created. `allow_mismatch=True`
    only warns. A model saved before identities were recorded is accepted with a one-time warning.

    Returns the tokenizer's identity, which a caller may record in a model that has none."""
    current = visual_tokenizer_identity(visual_tokenizer)
    recorded = getattr(model_config, "visual_tokenizer_identity", None)
    model_name = getattr(model_config, "_name_or_path", "") or "this model"
    if not recorded:
        warn_once(logger, f"{model_name} records no visual tokenizer identity (saved before UniMM recorded it): "
                          f"cannot check that {_describe(current)} is the tokenizer it was trained with")
        return current
    if all(recorded.get(key) == current[key] for key in IDENTITY_KEYS):
        return current
    message = (f"visual tokenizer mismatch: {model_name} was trained with {_describe(recorded)}, but the visual "
               f"tokenizer given is {_describe(current)}")
    if not allow_mismatch:
        raise VisualTokenizerMismatchError(message + "; pass the tokenizer it was trained with, or allow the "
                                                     "mismatch explicitly (allow_mismatch=True) to use this one")
    logger.warning("%s; continuing because the mismatch is allowed", message)
    return current


__all__ = ["VisualTokenizerMismatchError", "check_visual_tokenizer", "visual_tokenizer_identity"]
