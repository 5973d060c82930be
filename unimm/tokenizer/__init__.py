"""unimm.tokenizer: visual tokenizers (VQRAE, DualToken) that turn images into discrete codes and back.

Public entry points are imported lazily so that `import unimm.tokenizer.types` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_tokenizer": "unimm.tokenizer.presets",
    "load_tokenizer": "unimm.tokenizer.presets",
    "load_visual_tokenizer": "unimm.tokenizer.presets",
    "PRESETS": "unimm.tokenizer.presets",
    "tiny_encoder_config": "unimm.tokenizer.presets",
    "VQRAE": "unimm.tokenizer.vqrae",
    "DualToken": "unimm.tokenizer.dualtoken",
    "VQRAEConfig": "unimm.tokenizer.configuration",
    "DualTokenConfig": "unimm.tokenizer.configuration",
    "DenoisingConfig": "unimm.tokenizer.configuration",
    "TokenizerOutput": "unimm.tokenizer.base",
    "VisualTokenizer": "unimm.tokenizer.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unimm.tokenizer' has no attribute {name!r}")
