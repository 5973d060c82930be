"""Paper presets on real encoder geometries, with random weights saved locally: DualToken on a patch-14 SigLIP at
384 px (27 x 27 = 729 positions, the last 6 pixels unseen by the encoder), VQRAE on a NaFlex SigLIP2 that has no
size of its own. The default tests keep the paper's patch, size, codebooks and depths with a narrow encoder; the
`slow` test (opt-in: UNIMM_PAPER_SHAPES=1) builds the real so400m width and depth."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from unimm.tokenizer import build_tokenizer, load_tokenizer
from unimm.tokenizer.cnn_decoder import CNNDecoder
from unimm.tokenizer.configuration import DenoisingConfig
from unimm.tokenizer.presets import dualtoken_depths

# DualToken layer indices for a 4-layer stand-in of the 27-layer so400m (paper: pixel 6 + 0.6 x 4, semantic 26).
NARROW_LAYERS = dict(pixel_layer=2, shortcut_layer=1, semantic_layer=3)


def _save_siglip(path, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, patch_size=14,
                 image_size=384):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                intermediate_size=intermediate_size, patch_size=patch_size, image_size=image_size)
    SiglipVisionModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def patch14_siglip_384(tmp_path_factory):
    return _save_siglip(tmp_path_factory.mktemp("siglip_p14_384"))


def test_dualtoken_384_on_patch14_siglip_round_trips_384_images(patch14_siglip_384, tmp_path):
    model = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=patch14_siglip_384, **NARROW_LAYERS).eval()
    assert model.image_size == 384 and model.patch_size == 14 and model.num_positions == 729
    spec = model.codebook_spec
    assert (spec["pixel"].num_codes, spec["pixel"].depth, spec["semantic"].depth) == (16384, 8, 8)
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        codes = model.encode(pixels)
        assert codes["pixel"].shape == (1, 729, 8) and codes["semantic"].shape == (1, 729, 8)
        decoded = model.decode(codes)
        assert decoded.shape == (1, 3, 384, 384)
        output = model(pixels)  # the training forward reconstructs at the input size too
    assert output.reconstruction.shape == (1, 3, 384, 384)
    model.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.encode(pixels)["pixel"], codes["pixel"])


def test_dualtoken_depth_follows_positions_not_pixels(patch14_siglip_384):
    assert dualtoken_depths(729) == {"pixel_depth": 8, "semantic_depth": 8}
    assert dualtoken_depths(324)["pixel_depth"] == 4 and dualtoken_depths(256)["pixel_depth"] == 4
    small = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=patch14_siglip_384, image_size=256,
                            decoder_type="vit", **NARROW_LAYERS)
    assert small.num_positions == 18 * 18 and small.codebook_spec["pixel"].depth == 4
    # 378 px (the workaround of the old multiple-of-14 check) is still 27 x 27 positions: depth 8, not 4
    same_grid = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=patch14_siglip_384, image_size=378,
                                decoder_type="vit", **NARROW_LAYERS)
    assert same_grid.num_positions == 729 and same_grid.codebook_spec["semantic"].depth == 8
    explicit = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=patch14_siglip_384, pixel_depth=2,
                               decoder_type="vit", **NARROW_LAYERS)
    assert explicit.codebook_spec["pixel"].depth == 2 and explicit.codebook_spec["semantic"].depth == 8


def test_vqrae_256_preset_sets_its_size_on_a_naflex_siglip2(tmp_path):
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 patch_size=16, num_patches=256)
    assert getattr(config, "image_size", None) is None  # NaFlex: no size of its own
    Siglip2VisionModel(config).save_pretrained(tmp_path / "naflex")
    model = build_tokenizer("vqrae-siglip2-so400m-256", encoder_path=tmp_path / "naflex", code_dim=32,
                            num_codes=512).eval()
    assert model.image_size == 256 and model.num_positions == 256
    with torch.no_grad():
        decoded = model.decode(model.encode(torch.randn(1, 3, 256, 256)))
    assert decoded.shape == (1, 3, 256, 256)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("UNIMM_PAPER_SHAPES") != "1", reason=(
    "paper-sized: 841M parameters, ~80 s and 3.4 GB on 2 CPU cores; set UNIMM_PAPER_SHAPES=1 to run"))
def test_dualtoken_paper_preset_on_real_so400m_config(tmp_path):
    """The real SigLIP so400m-patch14-384 geometry (1152 wide, 27 layers, 16 heads, MLP 4304), random weights."""
    encoder = _save_siglip(tmp_path / "so400m", hidden_size=1152, num_layers=27, num_heads=16,
                           intermediate_size=4304)
    model = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=encoder).eval()
    assert model.num_positions == 729 and model.codebook_spec["pixel"].depth == 8
    assert isinstance(model.decoder, CNNDecoder)
    with torch.no_grad():
        decoded = model.decode(model.encode(torch.randn(1, 3, 384, 384)))
    assert decoded.shape == (1, 3, 384, 384)


@pytest.fixture(scope="module")
def narrow_so400m_layout(tmp_path_factory):
    """The so400m-patch14-384 layer layout (27 layers, patch 14, 384 px) at a narrow width, so that the paper's
    layer indices (6, 4, 26) resolve as they do on the real checkpoint."""
    return _save_siglip(tmp_path_factory.mktemp("siglip_27"), hidden_size=32, num_layers=27, num_heads=2,
                        intermediate_size=64)


def _naflex_siglip2(path):
    torch.manual_seed(0)
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, patch_size=16, num_patches=256)).save_pretrained(path)
    return path


@pytest.mark.parametrize("detok", [False, True], ids=["paper", "detok"])
def test_dualtoken_paper_preset_resolves_to_the_reference_recipe(narrow_so400m_layout, detok):
    name = "dualtoken-siglip-so400m-384" + ("-detok" if detok else "")
    cfg = build_tokenizer(name, encoder_path=narrow_so400m_layout).config
    pinned = dict(
        train_encoder=True, pixel_layer=6, shortcut_layer=4, shortcut_weight=0.6, semantic_layer=26,
        pixel_code_dim=32, semantic_code_dim=32, pixel_num_codes=16384, semantic_num_codes=16384,
        pixel_depth=8, semantic_depth=8, image_size=384, per_tap_projection=True, projection_block="attention",
        decoder_type="cnn", semantic_weight=5.0, semantic_pooled_loss=True, semantic_pooled_weight=1.0,
        quantizer_beta=5.0, pixel_ema_per_depth=True, semantic_ema_per_depth=False, up_projection_causal=True,
        semantic_layer_target="quantized", semantic_layer_loss="mse_cos",
        latent_norm=detok,  # the reference has no norm before the decoder; l-DeTok's noise scale needs one
    )
    assert {key: getattr(cfg, key) for key in pinned} == pinned
    expected = DenoisingConfig.paper() if detok else DenoisingConfig()  # the default corrupts nothing
    assert DenoisingConfig.from_value(cfg.denoising).to_dict() == expected.to_dict()


@pytest.mark.parametrize("detok", [False, True], ids=["paper", "detok"])
def test_vqrae_paper_preset_resolves_to_the_paper_recipe(tmp_path, detok):
    name = "vqrae-siglip2-so400m-256" + ("-detok" if detok else "")
    cfg = build_tokenizer(name, encoder_path=_naflex_siglip2(tmp_path / "naflex")).config
    pinned = dict(code_dim=1536, num_codes=16384, quantizer_beta=0.25, distill_weight=1.0, image_size=256,
                  latent_norm=detok)
    assert {key: getattr(cfg, key) for key in pinned} == pinned
    expected = DenoisingConfig.paper() if detok else DenoisingConfig()
    assert DenoisingConfig.from_value(cfg.denoising).to_dict() == expected.to_dict()
