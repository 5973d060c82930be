"""Configs of the visual tokenizers: `VQRAEConfig`, `DualTokenConfig` (Hugging Face `PretrainedConfig`s, saved as
config.json with the encoder's config nested inside) and `DenoisingConfig` (l-DeTok training options).

Decoder sizes left at `None` mirror the encoder (the symmetric ViT decoder of VQRAE/RAE).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig


@dataclass
class DenoisingConfig:
    """l-DeTok corruption of the decoder input (docs/DESIGN.md §2.4). Active only in training mode."""

    noise_gamma: float = field(default=0.0, metadata={"help": "Latent noise std gamma (paper 3.0); 0 disables noise."})
    noise_mode: str = field(
        default="interpolative",
        metadata={"help": "'interpolative': (1-tau) z + tau*gamma*eps; 'additive': z + tau*gamma*eps."},
    )
    mask_ratio_max: float = field(
        default=0.0, metadata={"help": "M in m = max(0, U(mask_ratio_min, M)) (paper 0.7); 0 disables masking."}
    )
    mask_ratio_min: float = field(default=-0.1, metadata={"help": "Lower end of the mask-ratio uniform (paper -0.1)."})
    code_replace_prob: float = field(
        default=0.0, metadata={"help": "Fraction of codes swapped for random codes before lookup; 0 disables."}
    )
    encoder_drop_masked: bool = field(
        default=False,
        metadata={"help": "MAE-style: masked patches never enter a trainable encoder (VQRAE stage 2 only)."},
    )

    def __post_init__(self):
        if self.noise_mode not in ("interpolative", "additive"):
            raise ValueError(f"denoising.noise_mode must be 'interpolative' or 'additive', got {self.noise_mode!r}")
        if self.noise_gamma < 0:
            raise ValueError(f"denoising.noise_gamma must be >= 0, got {self.noise_gamma}")
        if not 0.0 <= self.mask_ratio_max < 1.0:
            raise ValueError(f"denoising.mask_ratio_max must be in [0, 1), got {self.mask_ratio_max}")
        if self.mask_ratio_min > self.mask_ratio_max and self.mask_ratio_max > 0:
            raise ValueError(
                f"denoising.mask_ratio_min={self.mask_ratio_min} exceeds mask_ratio_max={self.mask_ratio_max}"
            )
        if not 0.0 <= self.code_replace_prob <= 1.0:
            raise ValueError(f"denoising.code_replace_prob must be in [0, 1], got {self.code_replace_prob}")

    @property
    def enabled(self) -> bool:
        return self.noise_gamma > 0 or self.mask_ratio_max > 0 or self.code_replace_prob > 0

    @classmethod
    def paper(cls) -> DenoisingConfig:
        """l-DeTok's joint denoising values: gamma 3.0 interpolative noise, mask ratio max(0, U(-0.1, 0.7))."""
        return cls(noise_gamma=3.0, noise_mode="interpolative", mask_ratio_max=0.7, mask_ratio_min=-0.1)

    @classmethod
    def from_value(cls, value: DenoisingConfig | dict[str, Any] | None) -> DenoisingConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"denoising must be a DenoisingConfig or a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown denoising key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that change how a tokenizer trains but not which codes it produces: excluded from `config_hash`.
TRAINING_ONLY_KEYS = (
    "denoising",
    "train_encoder",
    "distill_weight",
    "semantic_weight",
    "semantic_pooled_loss",
    "semantic_pooled_weight",
    "encoder_attn_implementation",
    "quantizer_beta",
    "quantizer_beta_on",
    "ema_decay",
    "ema_eps",
    "restart_threshold",
    "semantic_layer_target",
    "semantic_layer_loss",
    "pixel_ema_per_depth",
    "semantic_ema_per_depth",
)
_HF_VOLATILE_KEYS = (
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
)


_LATER_FIELD_DEFAULTS = {
    "image_aspect": "crop",
    "encoder_position_embedding": True,
    "projection_block": "linear",
    "per_tap_projection": False,
    "decoder_type": "vit",
    "cnn_decoder_input_width": None,
    "cnn_decoder_in_channels": 1024,
    "cnn_decoder_channels": 128,
    "cnn_decoder_channel_mult": None,
    "cnn_decoder_num_res_blocks": 2,
    "cnn_decoder_attn_resolutions": None,
    "up_projection_causal": True,
}


class _TokenizerConfigBase(PretrainedConfig):
    """Fields shared by both tokenizers."""

    encoder_config: dict | None = field(
        default=None,
        metadata={"help": "Config dict of the HF vision encoder (with model_type); stored in the checkpoint."},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (square); None = encoder's."})
    image_mean: list | None = field(
        default=None, metadata={"help": "Per-channel mean of the encoder's image processor."}
    )
    image_std: list | None = field(default=None, metadata={"help": "Per-channel std of the encoder's image processor."})
    image_aspect: str = field(
        default="crop",
        metadata={"help": "Non-square images: 'crop' (short side to image_size, centre crop) or 'pad' (to a square "
                          "filled with image_mean, LLaVA's image_aspect_ratio pad)."},
    )
    decoder_hidden_size: int | None = field(default=None, metadata={"help": "ViT decoder width; None = encoder width."})
    decoder_num_layers: int | None = field(default=None, metadata={"help": "ViT decoder depth; None = encoder depth."})
    decoder_num_heads: int | None = field(default=None, metadata={"help": "ViT decoder heads; None = encoder heads."})
    decoder_intermediate_size: int | None = field(
        default=None, metadata={"help": "ViT decoder MLP width; None = encoder's (or 4x width)."}
    )
    latent_norm: bool = field(
        default=True,
        metadata={"help": "Normalise the decoder-input latent per token (sets the scale l-DeTok noise acts on)."},
    )
    denoising: dict | None = field(
        default=None, metadata={"help": "l-DeTok options (see DenoisingConfig); training only."}
    )
    encoder_attn_implementation: str | None = field(
        default=None, metadata={"help": "Encoder attention backend: None/'auto' chooses (sdpa or flash_attention_2)."}
    )
    encoder_position_embedding: bool = field(
        default=True,
        metadata={"help": "False: zero the vision encoder's learned position embedding and keep it frozen, so a "
                          "patch's codes do not depend on where it lies (a random encoder trained from scratch)."},
    )

    def __post_init__(self, **kwargs):
        self.denoising = DenoisingConfig.from_value(self.denoising).to_dict()
        if self.image_aspect not in ("crop", "pad"):
            raise ValueError(f"image_aspect must be 'crop' or 'pad', got {self.image_aspect!r}")
        super().__post_init__(**kwargs)

    @property
    def denoising_config(self) -> DenoisingConfig:
        return DenoisingConfig.from_value(self.denoising)

    def decoder_sizes(self) -> dict[str, int]:
        enc = self.encoder_config or {}
        width = self.decoder_hidden_size or enc.get("hidden_size")
        ratio_default = enc.get("intermediate_size") or 4 * int(width)
        if self.decoder_hidden_size is not None and self.decoder_intermediate_size is None:
            ratio_default = 4 * int(width)
        return {
            "hidden_size": int(width),
            "num_layers": int(self.decoder_num_layers or enc.get("num_hidden_layers")),
            "num_heads": int(self.decoder_num_heads or enc.get("num_attention_heads")),
            "intermediate_size": int(self.decoder_intermediate_size or ratio_default),
        }

    def hash_dict(self) -> dict[str, Any]:
        data = self.to_dict()
        # Fields added later are left out at their default, so existing code caches keep their hash.
        for key, default in _LATER_FIELD_DEFAULTS.items():
            if data.get(key) == default:
                data.pop(key, None)
        return {
            k: v
            for k, v in data.items()
            if k not in TRAINING_ONLY_KEYS and k not in _HF_VOLATILE_KEYS and not k.startswith("_")
        }

    def config_hash(self) -> str:
        """sha256 of the architecture-defining fields (stable across save/load; ignores training-only options)."""
        payload = json.dumps(self.hash_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


class VQRAEConfig(_TokenizerConfigBase):
    """VQRAE: VFM encoder -> linear -> SimVQ -> linear -> symmetric ViT decoder (docs/DESIGN.md §2.2)."""

    model_type = "unimm_vqrae"

    code_dim: int = field(default=32, metadata={"help": "SimVQ code dimension (paper 1536)."})
    num_codes: int = field(default=512, metadata={"help": "SimVQ codebook size (paper 16384)."})
    quantizer_beta: float = field(default=0.25, metadata={"help": "SimVQ loss weight beta."})
    quantizer_beta_on: str = field(
        default="commitment", metadata={"help": "Which SimVQ term gets beta: 'commitment' (SimVQ paper) or 'codebook'."}
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Stage-2 self-distillation weight lambda_d."})


class DualTokenConfig(_TokenizerConfigBase):
    """DualToken: SigLIP with a shallow pixel branch and a deep semantic branch, each ResidualVQ
    (docs/DESIGN.md §2.3)."""

    model_type = "unimm_dualtoken"

    pixel_layer: int = field(
        default=2, metadata={"help": "Hidden state (1-based layer output) for pixel codes (paper 6)."}
    )
    shortcut_layer: int | None = field(
        default=1, metadata={"help": "Extra shallow layer added to the pixel features (paper 4)."}
    )
    shortcut_weight: float = field(default=0.6, metadata={"help": "Weight of the shortcut layer (paper 0.6)."})
    semantic_layer: int = field(
        default=3, metadata={"help": "Hidden state replaced by semantic codes (paper 26 of 27)."}
    )
    pixel_code_dim: int = field(default=16, metadata={"help": "Pixel-branch code dimension (paper 32)."})
    semantic_code_dim: int = field(default=16, metadata={"help": "Semantic-branch code dimension (paper 32)."})
    pixel_num_codes: int = field(default=256, metadata={"help": "Pixel codebook size (paper 16384)."})
    semantic_num_codes: int = field(default=256, metadata={"help": "Semantic codebook size (paper 16384)."})
    pixel_depth: int = field(
        default=2, metadata={"help": "Residual depth of pixel codes (paper 8 at 384 px, 4 at 256)."}
    )
    semantic_depth: int = field(default=2, metadata={"help": "Residual depth of semantic codes (paper 8 at 384 px)."})
    shared_codebook: bool = field(default=True, metadata={"help": "One codebook shared by all residual depths."})
    quantizer_beta: float = field(default=0.25, metadata={"help": "ResidualVQ commitment weight beta."})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebooks."})
    ema_eps: float = field(default=1e-5, metadata={"help": "Laplace smoothing of the EMA counts."})
    restart_threshold: float = field(default=1.0, metadata={"help": "Restart codes whose EMA count falls below this."})
    semantic_weight: float = field(
        default=1.0, metadata={"help": "Weight of the semantic loss (MSE + 1 - cos) at semantic_layer (paper 5)."}
    )
    semantic_pooled_loss: bool = field(default=True, metadata={"help": "Also match the teacher's pooled output."})
    semantic_pooled_weight: float | None = field(
        default=None, metadata={"help": "Weight of the pooled-output term; None = semantic_weight (paper 1)."}
    )
    semantic_layer_target: str = field(
        default="quantized",
        metadata={"help": "What the semantic_layer term compares with the teacher's hidden state there: 'quantized' "
                          "(the projection back from the semantic codes; reference HEAD train.py) or 'encoder' "
                          "(the encoder's own pre-quantisation hidden state; reference commit 41be90e stage 1)."},
    )
    semantic_layer_loss: str = field(
        default="mse_cos",
        metadata={"help": "The semantic_layer term: 'mse_cos' (MSE + 1 - cos) or 'cos' (1 - cos only; the "
                          "reference's stage 2)."},
    )
    pixel_ema_per_depth: bool = field(
        default=False,
        metadata={"help": "Pixel ResidualVQ: EMA step depth by depth inside the residual loop (reference 'rq' "
                          "quantizer) instead of once after all depths."},
    )
    semantic_ema_per_depth: bool = field(
        default=False,
        metadata={"help": "Semantic ResidualVQ: EMA step depth by depth (the reference's semantic 'rq_ema' "
                          "quantizer updates once after all depths)."},
    )
    up_projection_causal: bool = field(
        default=True,
        metadata={"help": "Attention projection blocks from the codes back up (semantic projection out, CNN decoder "
                          "input) attend causally in raster order (reference HEAD); False: bidirectional (41be90e)."},
    )
    train_encoder: bool = field(
        default=False, metadata={"help": "Train the SigLIP encoder (a frozen teacher is kept)."}
    )
    projection_block: str = field(
        default="linear",
        metadata={"help": "Projections to and from the codes: 'linear' or 'attention' (LayerNorm + attention + "
                          "GeGLU MLP, the reference's; also the CNN decoder's input block)."},
    )
    per_tap_projection: bool = field(
        default=False,
        metadata={"help": "Project pixel_layer and shortcut_layer each on its own, then sum the codes-dim outputs "
                          "(reference); False: sum the encoder-width states, then project once."},
    )
    decoder_type: str = field(default="vit", metadata={"help": "Pixel decoder: 'vit' or 'cnn' (VQGAN-style, paper)."})
    cnn_decoder_input_width: int | None = field(
        default=None, metadata={"help": "CNN decoder: width the codes are projected to; None = encoder width."}
    )
    cnn_decoder_in_channels: int = field(
        default=1024, metadata={"help": "CNN decoder: channels after the post-quantisation ResNet block (paper 1024)."}
    )
    cnn_decoder_channels: int = field(default=128, metadata={"help": "CNN decoder: base channel count (paper 128)."})
    cnn_decoder_channel_mult: list | None = field(
        default=None,
        metadata={"help": "CNN decoder: per-level channel multipliers, finest first; None = [1, 1, 4, 4, 8] (paper)."},
    )
    cnn_decoder_num_res_blocks: int = field(default=2, metadata={"help": "CNN decoder: ResNet blocks per level."})
    cnn_decoder_attn_resolutions: list | None = field(
        default=None, metadata={"help": "CNN decoder: grid sizes with self-attention; None = the base grid only."}
    )

    def __post_init__(self, **kwargs):
        if self.projection_block not in ("linear", "attention"):
            raise ValueError(f"projection_block must be 'linear' or 'attention', got {self.projection_block!r}")
        if self.decoder_type not in ("vit", "cnn"):
            raise ValueError(f"decoder_type must be 'vit' or 'cnn', got {self.decoder_type!r}")
        if self.semantic_layer_target not in ("quantized", "encoder"):
            raise ValueError(
                f"semantic_layer_target must be 'quantized' or 'encoder', got {self.semantic_layer_target!r}"
            )
        if self.semantic_layer_loss not in ("mse_cos", "cos"):
            raise ValueError(f"semantic_layer_loss must be 'mse_cos' or 'cos', got {self.semantic_layer_loss!r}")
        super().__post_init__(**kwargs)
