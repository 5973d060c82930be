"""Scoring UniMM models with outside evaluation harnesses.

`unimm.eval.lmms` is the `unimm` model of lmms-eval (installed with the `eval` extra). lmms-eval finds it through
the `lmms_eval.models` entry point declared in pyproject.toml, which calls `lmms_eval_manifest`; nothing here
imports lmms-eval until lmms-eval itself asks.
"""

from __future__ import annotations

from typing import Any


def lmms_eval_manifest() -> Any:
    """The `ModelManifest` lmms-eval's registry loads from our entry point: `--model unimm` resolves to
    `unimm.eval.lmms.UniMMLmms`, imported only when that model is requested."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="unimm", simple_class_path="unimm.eval.lmms.UniMMLmms")
