"""`UniMMConfig`: the wrapped LLM's config (nested as `text_config`), the vocabulary layout, the codebook spec
and the sizes of the visual modules (code embeddings, feature projector, depth-transformer heads)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig

from unimm.llm.embedding import IMAGE_POSITION_TYPES, PROJECTOR_TYPES, SINCOS_TEMPERATURE
from unimm.llm.layout import VocabLayout
from unimm.tokenizer.types import CodebookGroupSpec, CodebookSpec, codebook_spec_from_dict, codebook_spec_to_dict
from unimm.utils.hf_compat import SubConfigSpec


@strict
class UniMMConfig(PretrainedConfig):
    """Configuration of `UniMMForCausalLM`.

    text_config:                 config of the wrapped causal LM (Qwen2, Qwen2.5, Qwen3, LLaMA ...).
    codebook_spec:               group name -> {"num_codes", "depth", "code_dim"} (docs/DESIGN.md §2.6).
    codebook_group_order:        the group order (concatenation order); defaults to codebook_spec's order.
    flat_codes:                  single group of depth 1 whose codes are LLM vocabulary tokens (no code
                                 embedding tables, no depth heads: the LM head predicts the codes).
    vocab_layout:                `VocabLayout.to_dict()`, written by `extend_tokenizer_and_model`.
    code_embed_dim:              width of each group's code embedding before the groups are concatenated and
                                 projected to the LLM width (default: the LLM hidden size).
    per_depth_code_embeddings:   one code table per depth instead of one per group.
    feature_dim:                 width of continuous encoder features (VQRAE understanding, a CLIP/SigLIP
                                 vision tower); enables the feature projector.
    feature_projector_type:      "mlp2x_gelu" (LLaVA-1.5, default) or "linear" (LLaVA's `--mm_projector_type`).
    vision_tower:                the plain vision tower whose features the projector reads
                                 (`unimm.llm.vision_tower.VisionTower.to_dict()`: path, select layer and feature,
                                 image aspect), so inference rebuilds the same inputs; None otherwise.
    depth_head_*:                the depth transformer run at every visual target (docs/DESIGN.md §3).
    shared_depth_classifier:     one classifier for all depths of a group instead of one per depth.
    visual_loss_weight:          weight of each visual position's loss relative to a text token's.
    num_image_positions:         N, visual positions per image (the tokenizer's `num_positions`); the default
                                 length of generated images.
    image_position_embedding:    add a learned embedding of the position inside the image (0..N-1, raster order)
                                 to every visual input (codes, features or flat code tokens). The LLM then knows
                                 where in the image it is without counting from `<|boi|>` through RoPE, which
                                 small models learn slowly. Needs `num_image_positions`.
    image_position_embedding_type: "learned" (a trained row per position, the default) or "sincos_2d" (the fixed
                                 2D sine-cosine embedding of the position's row and column on the square grid,
                                 times a learned per-channel gain: a shape learnt at one place is drawn more
                                 readily at another).
    image_position_sincos_temperature: the sin-cos table's frequencies run from 1 down to 1/temperature (10000, as
                                 MAE's; on a small grid most of them are then almost constant across the image).
    llm_attn_implementation:     "auto" (see `unimm.utils.attention.select_attn_implementation`), "sdpa",
                                 "eager" or "flash_attention_2".
    visual_tokenizer_identity:   the visual tokenizer the model is trained with (`unimm.llm.identity`: its config
                                 hash, weights hash and path), checked by `check_visual_tokenizer`; None in models
                                 saved before it was recorded.
    """

    model_type = "unimm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    text_config: dict | PretrainedConfig | None = None
    codebook_spec: dict | None = None
    codebook_group_order: list | None = None
    flat_codes: bool = False
    vocab_layout: dict | None = None
    code_embed_dim: int | None = None
    per_depth_code_embeddings: bool = False
    feature_dim: int | None = None
    feature_projector_type: str = "mlp2x_gelu"
    vision_tower: dict | None = None
    depth_head_layers: int = 3
    depth_head_hidden_size: int | None = None
    depth_head_num_heads: int | None = None
    depth_head_intermediate_size: int | None = None
    depth_head_dropout: float = 0.0
    shared_depth_classifier: bool = False
    visual_loss_weight: float = 1.0
    num_image_positions: int | None = None
    image_position_embedding: bool = False
    image_position_embedding_type: str = "learned"
    image_position_sincos_temperature: float = SINCOS_TEMPERATURE
    llm_attn_implementation: str = "auto"
    visual_tokenizer_identity: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.codebook_spec = dict(self.codebook_spec or {})
        # config.json is written with sorted keys, so the group order (which fixes the concatenation order of the
        # visual embedding) is kept explicitly.
        if self.codebook_group_order is None:
            self.codebook_group_order = list(self.codebook_spec)
        if sorted(self.codebook_group_order) != sorted(self.codebook_spec):
            raise ValueError(f"UniMMConfig.codebook_group_order {self.codebook_group_order} does not name the groups "
                             f"of codebook_spec {sorted(self.codebook_spec)}")
        self.codebook_spec = {name: self.codebook_spec[name] for name in self.codebook_group_order}
        for name, group in self.codebook_spec.items():
            missing = {"num_codes", "depth", "code_dim"} - set(group)
            if missing:
                raise ValueError(f"UniMMConfig.codebook_spec[{name!r}] lacks {sorted(missing)}")
        if self.flat_codes and (len(self.codebook_spec) != 1 or next(iter(self.codebook_spec.values()))["depth"] != 1):
            raise ValueError("UniMMConfig.flat_codes needs exactly one codebook group of depth 1, "
                             f"got codebook_spec={self.codebook_spec}")
        if self.image_position_embedding and not self.num_image_positions:
            raise ValueError("UniMMConfig.image_position_embedding needs num_image_positions (the tokenizer's N)")
        if self.image_position_embedding_type not in IMAGE_POSITION_TYPES:
            raise ValueError(f"UniMMConfig.image_position_embedding_type must be one of {IMAGE_POSITION_TYPES}, got "
                             f"{self.image_position_embedding_type!r}")
        if self.image_position_sincos_temperature <= 1:
            raise ValueError("UniMMConfig.image_position_sincos_temperature must be greater than 1, got "
                             f"{self.image_position_sincos_temperature}")
        if self.visual_tokenizer_identity is not None and not {"config_hash", "weights_hash"} <= set(
                self.visual_tokenizer_identity):
            raise ValueError("UniMMConfig.visual_tokenizer_identity needs config_hash and weights_hash, got "
                             f"{sorted(self.visual_tokenizer_identity)}")
        if self.feature_projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"UniMMConfig.feature_projector_type must be one of {PROJECTOR_TYPES}, "
                             f"got {self.feature_projector_type!r}")
        if self.depth_head_layers < 1:
            raise ValueError(f"UniMMConfig.depth_head_layers must be >= 1, got {self.depth_head_layers}")
        # Text-level attributes that generation utilities and Trainer read from the top-level config.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    # -- derived values -------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def groups(self) -> CodebookSpec:
        """The codebook spec as typed `CodebookGroupSpec`s, in group order."""
        return codebook_spec_from_dict(self.codebook_spec)

    @property
    def layout(self) -> VocabLayout | None:
        return VocabLayout.from_dict(self.vocab_layout) if self.vocab_layout else None

    @property
    def head_hidden_size(self) -> int:
        return self.depth_head_hidden_size or self.text_config.hidden_size

    @property
    def head_num_heads(self) -> int:
        if self.depth_head_num_heads:
            return self.depth_head_num_heads
        return max(1, self.head_hidden_size // 64)

    @property
    def head_intermediate_size(self) -> int:
        return self.depth_head_intermediate_size or 4 * self.head_hidden_size

    @property
    def embed_dim(self) -> int:
        return self.code_embed_dim or self.text_config.hidden_size

    @staticmethod
    def spec_to_dict(spec: CodebookSpec | dict) -> dict[str, dict[str, int]]:
        """Accept typed specs, plain dicts, or `(num_codes, depth[, code_dim])` tuples per group."""
        out: dict[str, dict[str, int]] = {}
        for name, group in spec.items():
            if isinstance(group, CodebookGroupSpec):
                out[name] = group.to_dict()
            elif isinstance(group, dict):
                out[name] = dict(CodebookGroupSpec(**group).to_dict())
            else:
                values = tuple(group)
                out[name] = CodebookGroupSpec(values[0], values[1], values[2] if len(values) > 2 else 0).to_dict()
        return codebook_spec_to_dict(codebook_spec_from_dict(out))


# Keys every saved UniMM `config.json` holds that fix the architecture and have no safe default: without them a
# default-sized sub-model (a full-size Qwen2 for `text_config`) or default-depth heads would be built.
REQUIRED_SAVED_KEYS = ("text_config", "codebook_spec", "vocab_layout", "depth_head_layers")


def check_saved_config(config_dict: dict, source: str) -> None:
    """Raise `ModelFolderError` naming `source` and the keys when a saved UniMM config lacks any of
    `REQUIRED_SAVED_KEYS` (or its `text_config` names no model type); call before anything is built from it."""
    from unimm.utils.errors import ModelFolderError

    missing = [key for key in REQUIRED_SAVED_KEYS if key not in config_dict]
    text_config = config_dict.get("text_config")
    if "text_config" not in missing and not (isinstance(text_config, dict) and text_config.get("model_type")):
        missing.append("text_config.model_type")
    if missing:
        raise ModelFolderError(f"{source}: UniMM config lacks {', '.join(missing)}; nothing was built (a default "
                               "would give another model): restore the config.json written with the weights")


__all__ = ["REQUIRED_SAVED_KEYS", "UniMMConfig", "check_saved_config"]
