"""Named tokenizer presets (`build_tokenizer`) and loading saved tokenizers (`load_tokenizer`).

Tiny presets build random tiny encoders of real `transformers` classes from configs (milliseconds on CPU);
paper presets load the encoder from a local checkpoint given as `encoder_path` (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unimm.tokenizer.base import VisualTokenizer
from unimm.tokenizer.configuration import DenoisingConfig, DualTokenConfig, VQRAEConfig
from unimm.tokenizer.dualtoken import DualToken
from unimm.tokenizer.encoders import (
    clean_encoder_config,
    encoder_config_to_dict,
    has_image_size,
    image_processor_settings,
    load_encoder,
    patch_size_of,
)
from unimm.tokenizer.vqrae import VQRAE
from unimm.utils.errors import model_folder

TOKENIZER_CLASSES: dict[str, type[VisualTokenizer]] = {
    VQRAEConfig.model_type: VQRAE,
    DualTokenConfig.model_type: DualToken,
}


def tiny_encoder_config(
    encoder_type: str = "siglip",
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    use_head: bool = False,
) -> dict[str, Any]:
    """Config dict of a tiny random vision encoder: 'siglip' (SiglipVisionModel), 'siglip2' (Siglip2VisionModel)
    or 'dinov2' (Dinov2Model)."""
    if image_size % patch_size != 0:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    common = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads, patch_size=patch_size
    )
    intermediate = intermediate_size or 2 * hidden_size
    if encoder_type == "siglip":
        return dict(
            model_type="siglip_vision_model",
            image_size=image_size,
            intermediate_size=intermediate,
            vision_use_head=use_head,
            **common,
        )
    if encoder_type == "siglip2":
        grid = image_size // patch_size
        return dict(
            model_type="siglip2_vision_model",
            num_patches=grid * grid,
            intermediate_size=intermediate,
            vision_use_head=use_head,
            **common,
        )
    if encoder_type == "dinov2":
        return dict(model_type="dinov2", image_size=image_size, mlp_ratio=max(1, intermediate // hidden_size), **common)
    raise ValueError(f"encoder_type must be 'siglip', 'siglip2' or 'dinov2', got {encoder_type!r}")


def _split_overrides(config_cls: type, overrides: dict[str, Any], preset: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"preset {preset!r}: unknown override(s) {unknown}; valid: {sorted(known)}")
    if isinstance(overrides.get("denoising"), DenoisingConfig):
        overrides["denoising"] = overrides["denoising"].to_dict()
    return overrides


def _tiny(
    config_cls: type, model_cls: type, preset: str, defaults: dict[str, Any], use_head: bool, num_layers: int
) -> Callable[..., VisualTokenizer]:
    def build(
        encoder_type: str = "siglip",
        image_size: int = 32,
        patch_size: int = 4,
        encoder_hidden_size: int = 64,
        encoder_num_layers: int = num_layers,
        encoder_num_heads: int = 4,
        seed: int | None = 0,
        encoder_path: str | Path | None = None,
        encoder_use_head: bool = use_head,
        **overrides: Any,
    ) -> VisualTokenizer:
        if encoder_path is not None:
            return _from_encoder_path(
                config_cls, model_cls, preset, encoder_path, {**defaults, **overrides}, image_size=image_size, seed=seed
            )
        encoder_config = tiny_encoder_config(
            encoder_type,
            image_size,
            patch_size,
            encoder_hidden_size,
            encoder_num_layers,
            encoder_num_heads,
            use_head=encoder_use_head,
        )
        fields = _split_overrides(config_cls, {**defaults, **overrides}, preset)
        if seed is not None:
            torch.manual_seed(seed)
        return model_cls(config_cls(encoder_config=encoder_config, image_size=image_size, **fields))

    return build


def _from_encoder_path(
    config_cls: type,
    model_cls: type,
    preset: str,
    encoder_path: str | Path | None,
    fields: dict[str, Any],
    image_size: int | None = None,
    seed: int | None = 0,
    fields_for_positions: Callable[[int], dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    fallback_image_size: int | None = None,
) -> VisualTokenizer:
    """`fields_for_positions(num_positions)` sets fields that follow the encoder's number of positions at the chosen
    size (between the preset's `fields` and the caller's `overrides`, which win). The size is `image_size`, else
    the checkpoint's (image processor, then config), else `fallback_image_size` (NaFlex encoders have none)."""
    if encoder_path is None:
        raise ValueError(
            f"preset {preset!r} needs encoder_path=<local Hugging Face checkpoint of the vision "
            "encoder> (nothing is downloaded); e.g. build_tokenizer("
            f"{preset!r}, encoder_path='/models/siglip2-so400m-patch16-256')"
        )
    encoder = load_encoder(encoder_path, fields.get("encoder_attn_implementation"))
    encoder_config = encoder_config_to_dict(encoder)
    if image_size is None and fallback_image_size is not None and not has_image_size(encoder_config, encoder_path):
        image_size = fallback_image_size
    settings = image_processor_settings(encoder_config, path=encoder_path, image_size=image_size)
    if fields_for_positions is not None:
        grid = settings.image_size // patch_size_of(encoder_config)
        fields = {**fields, **fields_for_positions(grid * grid)}
    fields = _split_overrides(config_cls, {**fields, **(overrides or {})}, preset)
    fields.setdefault("image_mean", list(settings.image_mean))
    fields.setdefault("image_std", list(settings.image_std))
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(
        config_cls(encoder_config=clean_encoder_config(encoder_config), image_size=settings.image_size, **fields)
    )
    model.encoder.load_state_dict(encoder.state_dict())
    return model


def _paper(
    config_cls: type,
    model_cls: type,
    preset: str,
    defaults: dict[str, Any],
    image_size: int,
    fields_for_positions: Callable[[int], dict[str, Any]] | None = None,
) -> Callable[..., VisualTokenizer]:
    """A paper preset. Its input size is `image_size` if given, else the checkpoint's, else the size in the preset's
    name (a NaFlex SigLIP2 has no size of its own); `fields_for_positions` is applied to the number of encoder
    positions at that size."""
    preset_size = image_size

    def build(
        encoder_path: str | Path | None = None, image_size: int | None = None, seed: int | None = 0, **overrides: Any
    ) -> VisualTokenizer:
        return _from_encoder_path(config_cls, model_cls, preset, encoder_path, dict(defaults), image_size=image_size,
                                  seed=seed, fields_for_positions=fields_for_positions, overrides=overrides,
                                  fallback_image_size=preset_size)

    return build


def dualtoken_depths(num_positions: int) -> dict[str, int]:
    """DualToken's residual depth follows the number of positions: 8 at 729 (SigLIP so400m, 384 px, patch 14),
    4 at fewer (256 px: 18 x 18 = 324 at patch 14, 16 x 16 at patch 16)."""
    depth = 8 if num_positions >= 729 else 4
    return {"pixel_depth": depth, "semantic_depth": depth}


# VQRAE paper: SigLIP2-so400m patch16 @ 256 px, code dim 1536, 16384 codes, symmetric ViT decoder. VQRAE trains
# without latent denoising; l-DeTok is the separate `-detok` preset. The paper's decoder takes the codes as they
# are (no normalisation before it, `latent_norm=False`); the `-detok` presets keep UniMM's per-token LayerNorm,
# which sets the unit scale l-DeTok's noise gamma is defined on. (The authors' code, KlingAIResearch/VQRAE, could
# not be read for this: the presets follow the paper.)
VQRAE_PAPER = dict(code_dim=1536, num_codes=16384, quantizer_beta=0.25, distill_weight=1.0, latent_norm=False)
# DualToken paper and reference (songweii/DualToken): SigLIP-so400m patch14 @ 384 px (27 layers), trained end to
# end (train_encoder). Pixel codes from layer 6 (+ 0.6 x layer 4), each tap projected on its own by a
# LayerNorm-first attention block and summed; semantic codes replace layer 26; 32-dim codes, 16384 per codebook,
# residual depth 8 at 729 positions (4 below); VQGAN-style CNN pixel decoder. Losses: 5 x (MSE + 1 - cos) at the
# semantic layer, 1 x on the pooled output, commitment 5. No latent denoising (that is the `-detok` preset) and no
# normalisation before the decoder (`latent_norm=False`; the reference's decoder takes the pixel codes as they are).
# The pixel codebook's EMA step runs depth by depth inside the residual loop (reference `rq` quantizer), the
# semantic one's once after all depths (`rq_ema`); the up-projections attend causally (reference HEAD).
# docs/TOKENIZER_FIDELITY.md lists every value with its source.
# 384 is not a multiple of 14: the encoder sees 27 x 27 patches and decodes are resized from 378 to 384 px.
DUALTOKEN_PAPER = dict(
    pixel_layer=6,
    shortcut_layer=4,
    shortcut_weight=0.6,
    semantic_layer=26,
    pixel_code_dim=32,
    semantic_code_dim=32,
    pixel_num_codes=16384,
    semantic_num_codes=16384,
    train_encoder=True,
    per_tap_projection=True,
    projection_block="attention",
    decoder_type="cnn",
    semantic_weight=5.0,
    semantic_pooled_weight=1.0,
    quantizer_beta=5.0,
    latent_norm=False,
    pixel_ema_per_depth=True,
    semantic_ema_per_depth=False,
    up_projection_causal=True,
)
_DETOK_LATENT = dict(denoising=DenoisingConfig.paper().to_dict(), latent_norm=True)

PRESETS: dict[str, Callable[..., VisualTokenizer]] = {
    # Tiny: SigLIP-shaped random encoder, 32 px / patch 4 -> 8x8 = 64 positions; decoder mirrors the encoder.
    "vqrae-tiny": _tiny(
        VQRAEConfig, VQRAE, "vqrae-tiny", dict(code_dim=32, num_codes=512), use_head=False, num_layers=2
    ),
    "dualtoken-tiny": _tiny(
        DualTokenConfig,
        DualToken,
        "dualtoken-tiny",
        dict(
            pixel_layer=2,
            shortcut_layer=1,
            shortcut_weight=0.6,
            semantic_layer=3,
            pixel_code_dim=16,
            semantic_code_dim=16,
            pixel_num_codes=256,
            semantic_num_codes=256,
            pixel_depth=2,
            semantic_depth=2,
        ),
        use_head=True,
        num_layers=4,
    ),
    "vqrae-siglip2-so400m-256": _paper(
        VQRAEConfig, VQRAE, "vqrae-siglip2-so400m-256", VQRAE_PAPER, image_size=256,
    ),
    "vqrae-siglip2-so400m-256-detok": _paper(
        VQRAEConfig, VQRAE, "vqrae-siglip2-so400m-256-detok", {**VQRAE_PAPER, **_DETOK_LATENT},
        image_size=256,
    ),
    "dualtoken-siglip-so400m-384": _paper(
        DualTokenConfig, DualToken, "dualtoken-siglip-so400m-384", DUALTOKEN_PAPER, image_size=384,
        fields_for_positions=dualtoken_depths,
    ),
    "dualtoken-siglip-so400m-384-detok": _paper(
        DualTokenConfig, DualToken, "dualtoken-siglip-so400m-384-detok",
        {**DUALTOKEN_PAPER, **_DETOK_LATENT}, image_size=384, fields_for_positions=dualtoken_depths,
    ),

}


def build_tokenizer(name: str, **overrides: Any) -> VisualTokenizer:
    """Build a preset tokenizer.

    Tiny presets take `encoder_type` ('siglip', 'siglip2', 'dinov2'), `image_size`, `patch_size`,
    `encoder_hidden_size`, `encoder_num_layers`, `encoder_num_heads`, `encoder_use_head`, `seed`; paper presets
    take `encoder_path` (required) and `image_size`. Any other keyword is a config field (e.g. `num_codes`,
    `denoising`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def load_tokenizer(path: str | Path, **kwargs: Any) -> VisualTokenizer:
    """Load a tokenizer saved with `save_pretrained`; the class is chosen from config.json's model_type."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no tokenizer checkpoint at {str(path)!r} (config.json missing)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in TOKENIZER_CLASSES:
        raise ValueError(
            f"{config_file}: model_type={model_type!r} is not a UniMM tokenizer; "
            f"expected one of {sorted(TOKENIZER_CLASSES)}"
        )
    return TOKENIZER_CLASSES[model_type].from_pretrained(path, **kwargs)


def load_visual_tokenizer(path: str | Path) -> VisualTokenizer:
    """A frozen visual tokenizer in eval mode, as the LLM programs use it (they never train it): training, chat,
    generation, evaluation. Loaded whole on every rank even under ZeRO-3, like a vision tower: the training step
    runs it outside the DeepSpeed engine (features for the projector), so partitioned weights would reach it
    empty. A folder that holds no tokenizer is a `ModelFolderError` naming `visual_tokenizer_path`."""
    from unimm.utils.parallel import zero3_init_disabled

    with model_folder("visual_tokenizer_path", path, "a UniMM visual tokenizer"), zero3_init_disabled():
        visual_tokenizer = load_tokenizer(path)
    visual_tokenizer.eval()
    visual_tokenizer.requires_grad_(False)
    return visual_tokenizer
