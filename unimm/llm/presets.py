"""Named sizes of the visual modules a new UniMM model gets on top of its LLM (code embeddings, depth heads,
image-position embedding), instead of JSON override strings.

    tiny     the quickstart's: one 128-wide depth-head layer per group (the default heads, as wide as the LLM,
             cost as much as a tiny LLM itself) and a learned image-position embedding, without which a tiny LLM
             places shapes at chance after 600 steps (benchmarks/results/quickstart.md). For tiny LLMs on CPU.
    default  `UniMMConfig`'s own defaults: 3 depth-head layers as wide as the LLM, one classifier per depth.
    paper    docs/DESIGN.md §3's depth transformer, pinned: 3 layers at the LLM's width, one classifier per depth, no
             image-position embedding; unlike `default` it does not follow later changes of UniMMConfig.

`VisualModulesConfig` is the typed config the LLM programs parse (`--model_preset tiny --depth_head_layers 2`): a
preset, then any field set explicitly over it. Only new models use it; a model loaded from `model_path` keeps its
saved config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from unimm.utils.config import Alias, config_field

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"depth_head_layers": 1, "depth_head_hidden_size": 128, "depth_head_intermediate_size": 512,
             "image_position_embedding": True},
    "default": {},
    "paper": {"depth_head_layers": 3, "depth_head_hidden_size": None, "depth_head_num_heads": None,
              "depth_head_intermediate_size": None, "shared_depth_classifier": False,
              "image_position_embedding": False},
}


def _overrides_to_fields(value: Any) -> dict[str, Any]:
    """The deprecated `model_config_overrides` (a JSON object string, or a YAML mapping) as typed fields."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"model_config_overrides must be a JSON object, got {value!r}") from err
    if not isinstance(value, dict):
        raise ValueError(f"model_config_overrides must be a JSON object, got {value!r}")
    known = {f.name for f in fields(VisualModulesConfig)} - {"model_preset"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"model_config_overrides: {unknown} are not visual-module options; valid: {sorted(known)}")
    return dict(value)


@dataclass
class VisualModulesConfig:
    """Sizes of a new model's visual modules: a named preset, then the fields set here (unset = the preset's)."""

    config_aliases = (Alias("model_config_overrides", "model_preset / the visual-module fields",
                            convert=_overrides_to_fields),)

    model_preset: str = config_field("default", f"Visual-module preset: {', '.join(MODEL_PRESETS)} (see "
                                     "unimm.llm.presets); the fields below override it.")
    depth_head_layers: int | None = config_field(None, "Transformer layers of each depth head.")
    depth_head_hidden_size: int | None = config_field(None, "Depth-head width (default: the LLM hidden size).")
    depth_head_num_heads: int | None = config_field(None, "Depth-head attention heads (default: width / 64).")
    depth_head_intermediate_size: int | None = config_field(None, "Depth-head MLP width (default: 4 x width).")
    depth_head_dropout: float | None = config_field(None, "Dropout inside the depth heads.")
    shared_depth_classifier: bool | None = config_field(
        None, "One classifier for all depths of a group instead of one per depth.")
    code_embed_dim: int | None = config_field(
        None, "Width of each group's code embedding before the projection (default: the LLM hidden size).")
    per_depth_code_embeddings: bool | None = config_field(None, "One code table per depth instead of per group.")
    visual_loss_weight: float | None = config_field(
        None, "Weight of a visual position's loss relative to a text token's.")
    image_position_embedding: bool | None = config_field(
        None, "Add a learned embedding of the position inside the image to every visual input.")
    image_position_embedding_type: str | None = config_field(
        None, "'learned' (a trained row per position) or 'sincos_2d' (fixed 2D sine-cosine of the row and column, "
              "times a learned gain).")
    image_position_sincos_temperature: float | None = config_field(
        None, "sincos_2d only: the frequencies run from 1 down to 1/temperature (default 10000).")
    num_image_positions: int | None = config_field(
        None, "Visual positions per image (default: the visual tokenizer's num_positions).")

    def __post_init__(self) -> None:
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"model_preset must be one of {list(MODEL_PRESETS)}, got {self.model_preset!r}")

    def overrides(self) -> dict[str, Any]:
        """`UniMMConfig` keyword arguments: the preset's values, then every field set here."""
        values = dict(MODEL_PRESETS[self.model_preset])
        values.update({f.name: getattr(self, f.name) for f in fields(self)
                       if f.name != "model_preset" and getattr(self, f.name) is not None})
        return values
