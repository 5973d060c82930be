"""DualToken architecture options: per-tap projections, LayerNorm-first attention projection blocks, CNN decoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unimm.tokenizer import build_tokenizer, load_tokenizer
from unimm.tokenizer.cnn_decoder import CNNDecoder
from unimm.tokenizer.projections import AttentionProjection

# Tiny CNN decoder: 3 levels (4x upsampling) turn the 8x8 grid of a 32 px / patch-4 tiny encoder into 32 px.
TINY_CNN = dict(
    decoder_type="cnn",
    cnn_decoder_channels=16,
    cnn_decoder_channel_mult=[1, 2, 2],
    cnn_decoder_in_channels=32,
    cnn_decoder_num_res_blocks=1,
)
OPTIONS = {
    "per-tap-linear": dict(per_tap_projection=True),
    "per-tap-attention": dict(per_tap_projection=True, projection_block="attention"),
    "cnn": TINY_CNN,
    "reference-form": dict(per_tap_projection=True, projection_block="attention", **TINY_CNN),
}


def _pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tiny_default_keeps_the_linear_vit_form():
    model = build_tokenizer("dualtoken-tiny")
    assert model.config.projection_block == "linear" and not model.config.per_tap_projection
    assert model.config.decoder_type == "vit" and model.shortcut_proj_in is None
    assert isinstance(model.pixel_proj_in, nn.Linear) and isinstance(model.semantic_proj_out, nn.Linear)
    # Fields added at their defaults leave the config hash (and so existing code caches) unchanged.
    assert not {"projection_block", "per_tap_projection", "decoder_type"} & set(model.config.hash_dict())
    assert build_tokenizer("dualtoken-tiny", per_tap_projection=True).config_hash() != model.config_hash()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_shapes_gradients_and_save_load_round_trip(option, tmp_path):
    model = build_tokenizer("dualtoken-tiny", train_encoder=True, **OPTIONS[option])
    model.set_train_encoder(True)
    x = _pixels()
    model.train()
    out = model(x)
    assert out.reconstruction.shape == x.shape and out.features.shape == (2, 64, model.encoder_hidden_size)
    assert out.losses["semantic"].dim() == 0 and torch.isfinite(out.loss)
    (out.loss + out.reconstruction.pow(2).mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs every one
    assert model.decoder_last_layer().grad.abs().sum() > 0

    model.eval()
    codes = model.encode(x)
    assert codes["pixel"].shape == (2, 64, 2) and codes["semantic"].shape == (2, 64, 2)
    image = model.decode(codes)
    assert image.shape == x.shape and torch.isfinite(image).all()
    model.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path).eval()
    for key, value in OPTIONS[option].items():
        assert getattr(loaded.config, key) == value
    assert type(loaded.decoder) is type(model.decoder) and type(loaded.pixel_proj_in) is type(model.pixel_proj_in)
    loaded_codes = loaded.encode(x)
    for group in codes:
        assert torch.equal(codes[group], loaded_codes[group])
    assert torch.equal(image, loaded.decode(loaded_codes))
    assert torch.equal(model.encode_features(x), loaded.encode_features(x))
    assert loaded.config_hash() == model.config_hash()


def test_per_tap_projection_projects_each_layer_then_sums():
    model = build_tokenizer("dualtoken-tiny", per_tap_projection=True).eval()
    cfg = model.config
    x = _pixels()
    hidden = model.encoder(pixel_values=x, output_hidden_states=True).hidden_states
    expected = model.pixel_proj_in(hidden[cfg.pixel_layer]) + cfg.shortcut_weight * model.shortcut_proj_in(
        hidden[cfg.shortcut_layer]
    )
    taps, _ = model._run_to_semantic(x, model._encoder_access)
    torch.testing.assert_close(model._pixel_latent(taps), expected)
    # The summed form is one map of the summed states: it differs from the per-tap one.
    summed = build_tokenizer("dualtoken-tiny").eval()
    taps, _ = summed._run_to_semantic(x, summed._encoder_access)
    combined = hidden[cfg.pixel_layer] + cfg.shortcut_weight * hidden[cfg.shortcut_layer]
    torch.testing.assert_close(summed._pixel_latent(taps), summed.pixel_proj_in(combined))
    # No shortcut contribution: no second projection (it would get no gradient).
    assert build_tokenizer("dualtoken-tiny", per_tap_projection=True, shortcut_weight=0.0).shortcut_proj_in is None


def test_attention_projection_normalises_its_input_first():
    torch.manual_seed(0)
    block = AttentionProjection(64, 16).eval()
    x = torch.randn(2, 9, 64)
    scale = torch.rand(2, 9, 1) * 100 + 0.5  # per-token scales, like SigLIP's outlier-heavy residual stream
    out = block(x)
    assert out.shape == (2, 9, 16)
    torch.testing.assert_close(block(x * scale), out, rtol=1e-4, atol=1e-4)
    linear = nn.Linear(64, 16)
    assert not torch.allclose(linear(x * scale), linear(x), atol=1e-2)


def test_attention_projection_up_is_causal_down_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    later = x.clone()
    later[:, 3:] += 5.0
    up = AttentionProjection(16, 64, is_causal=True).eval()
    assert up(x).shape == (1, 6, 64)
    torch.testing.assert_close(up(later)[:, :3], up(x)[:, :3])  # positions < 3 never see positions >= 3
    down = AttentionProjection(64, 16).eval()
    y = torch.randn(1, 6, 64)
    y_later = y.clone()
    y_later[:, 3:] += 5.0
    assert not torch.allclose(down(y_later)[:, :3], down(y)[:, :3])
    with pytest.raises(ValueError, match="divide"):
        AttentionProjection(48, 32)


def test_cnn_decoder_resizes_the_grid_to_its_base_and_upsamples():
    torch.manual_seed(0)
    decoder = CNNDecoder(16, 32, 64, 32, 16, [1, 2, 2], 1, attn_resolutions=[8, 16])
    assert decoder.base_grid == 8
    attention_levels = sum(type(m).__name__ == "SpatialAttention" for m in decoder.levels.modules())
    assert attention_levels == 2 * 2  # (num_res_blocks + 1) blocks at each of the 8 and 16 grids
    assert decoder(torch.randn(2, 64, 16)).shape == (2, 3, 32, 32)
    assert decoder(torch.randn(2, 81, 16)).shape == (2, 3, 32, 32)  # 9x9 grid, resized as the reference's 27 -> 24
    with pytest.raises(ValueError, match="divisible"):
        CNNDecoder(16, 30, 64, 32, 16, [1, 2, 2], 1)


def test_semantic_loss_weights_layer_and_pooled_terms_apart():
    x = _pixels()

    def semantic(**weights) -> torch.Tensor:
        model = build_tokenizer("dualtoken-tiny", train_encoder=True, **weights)  # same seed: same weights
        model.set_train_encoder(True)
        return model.train()(x).losses["semantic"].detach()

    layer_only = semantic(semantic_weight=1.0, semantic_pooled_weight=0.0)
    both = semantic(semantic_weight=1.0)
    pooled_only = both - layer_only
    assert pooled_only > 0 and layer_only > 0
    torch.testing.assert_close(semantic(semantic_weight=5.0, semantic_pooled_weight=1.0), 5 * layer_only + pooled_only)


def test_encoder_position_embedding_false_makes_patch_features_independent_of_the_place(tmp_path):
    from unimm.data.toy.shapes import render_shape

    images = [render_shape("red", "circle", "top left", 32, 0.43),
              render_shape("red", "circle", "bottom right", 32, 0.43)]

    def shifted_difference(model):
        """Largest difference between the encoder features of the two images, the second shifted back."""
        with torch.no_grad():
            features = model.encoder(pixel_values=model.preprocess(images)).last_hidden_state
        side = int(features.shape[1] ** 0.5)
        grid = features.reshape(2, side, side, -1)
        moved = torch.roll(grid[1], shifts=(side // 2, side // 2), dims=(0, 1))
        return (grid[0] - moved).abs().max().item(), grid.abs().max().item()

    torch.manual_seed(0)
    model = build_tokenizer("dualtoken-tiny", image_size=32, encoder_position_embedding=False).eval()
    table = model.encoder.embeddings.position_embedding.weight
    assert not table.requires_grad and not table.any()
    model.set_train_encoder(True)  # training the encoder does not bring the table back
    assert not model.encoder.embeddings.position_embedding.weight.requires_grad
    model.set_train_encoder(False)
    difference, scale = shifted_difference(model)
    assert difference < 1e-4 * scale  # the circle and the background moved: the same features, moved
    model.save_pretrained(tmp_path / "tok")
    assert not load_tokenizer(tmp_path / "tok").encoder.embeddings.position_embedding.weight.any()
    # With the table (the default) the same shift changes the features.
    torch.manual_seed(0)
    default = build_tokenizer("dualtoken-tiny", image_size=32).eval()
    difference, scale = shifted_difference(default)
    assert difference > 1e-2 * scale
    # The option is architecture (in the code-cache hash) but at its default leaves existing hashes unchanged.
    assert "encoder_position_embedding" not in default.config.hash_dict()
    assert model.config.config_hash() != default.config.config_hash()
