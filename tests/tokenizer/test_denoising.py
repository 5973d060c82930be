"""l-DeTok denoising: formulas checked statistically, and corruption confined to training-mode decoder inputs."""

from __future__ import annotations

import pytest
import torch

from unimm.tokenizer import DenoisingConfig, build_tokenizer
from unimm.tokenizer.denoising import (
    LatentDenoiser,
    additive_noise,
    interpolative_noise,
    random_position_mask,
    replace_codes,
    sample_mask_ratio,
    sample_noise_levels,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_interpolative_noise_moments():
    gamma = 3.0
    z = torch.full((4, 20000, 1), 2.0)
    tau = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy = interpolative_noise(z, tau, gamma, _gen())
    for i, t in enumerate(tau.tolist()):
        sample = noisy[i].flatten()
        assert sample.mean().item() == pytest.approx((1 - t) * 2.0, abs=0.06)  # std err <= 3/sqrt(2e4) = 0.02
        assert sample.std().item() == pytest.approx(t * gamma, abs=0.05 + 0.02 * t * gamma)


def test_additive_noise_keeps_the_signal():
    z = torch.full((2, 20000, 1), 2.0)
    noisy = additive_noise(z, torch.tensor([0.5, 1.0]), 3.0, _gen(1))
    assert noisy[0].mean().item() == pytest.approx(2.0, abs=0.05)
    assert noisy[1].mean().item() == pytest.approx(2.0, abs=0.08)
    assert noisy[0].std().item() == pytest.approx(1.5, abs=0.05)
    assert noisy[1].std().item() == pytest.approx(3.0, abs=0.08)


def test_noise_levels_are_uniform_per_sample():
    tau = sample_noise_levels(20000, torch.zeros(1), _gen(2))
    assert tau.shape == (20000,) and tau.min() >= 0 and tau.max() <= 1
    assert tau.mean().item() == pytest.approx(0.5, abs=0.01)
    assert tau.var().item() == pytest.approx(1 / 12, abs=0.005)


def test_mask_ratio_distribution():
    gen = _gen(3)
    ratios = torch.tensor([sample_mask_ratio(0.7, -0.1, gen) for _ in range(20000)])
    assert ratios.min().item() == 0.0 and ratios.max().item() <= 0.7
    # m = max(0, U(-0.1, 0.7)): P(m = 0) = 0.1 / 0.8; E[m] = 0.7^2 / (2 * 0.8); E[m | m > 0] = 0.35.
    assert (ratios == 0).float().mean().item() == pytest.approx(0.125, abs=0.01)
    assert ratios.mean().item() == pytest.approx(0.30625, abs=0.006)
    positive = ratios[ratios > 0]
    assert positive.mean().item() == pytest.approx(0.35, abs=0.006)
    assert positive.var().item() == pytest.approx(0.7**2 / 12, abs=0.003)


def test_position_mask_has_exact_count_and_uniform_positions():
    mask = random_position_mask(4000, 64, 0.25, generator=_gen(4))
    assert mask.dtype == torch.bool and (mask.sum(dim=1) == 16).all()
    frequency = mask.float().mean(dim=0)
    assert (frequency - 0.25).abs().max().item() < 0.04


def test_replace_codes_fraction_and_range():
    indices = torch.randint(0, 100, (64, 64, 2), generator=_gen(5))
    new, replaced = replace_codes(indices, 100, 0.3, _gen(6))
    assert replaced.float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(new[~replaced], indices[~replaced])
    assert new.min() >= 0 and new.max() < 100
    # a replaced code is a uniform draw, so it usually differs from the original
    assert (new[replaced] != indices[replaced]).float().mean().item() > 0.95


def test_latent_denoiser_only_acts_in_training():
    denoiser = LatentDenoiser(8, DenoisingConfig(noise_gamma=0.0, mask_ratio_max=0.6, mask_ratio_min=0.5))
    z = torch.randn(3, 40, 8)
    denoiser.eval()
    assert torch.equal(denoiser(z), z)
    denoiser.train()
    out = denoiser(z, _gen(7))
    masked = (out != z).any(dim=-1)
    assert masked.sum(dim=1).min() >= 20 and masked.sum(dim=1).max() <= 24  # ratio in [0.5, 0.6] of 40
    assert torch.equal(out[masked], denoiser.mask_token.detach().expand(int(masked.sum()), 8))
    denoiser.active = False
    assert torch.equal(denoiser(z), z)


def test_denoising_config_validation():
    with pytest.raises(ValueError, match="noise_mode"):
        DenoisingConfig(noise_mode="multiplicative")
    with pytest.raises(ValueError, match="mask_ratio_max"):
        DenoisingConfig(mask_ratio_max=1.5)
    with pytest.raises(ValueError, match="unknown denoising key"):
        DenoisingConfig.from_value({"gamma": 3.0})
    paper = DenoisingConfig.paper()
    assert paper.enabled and paper.noise_gamma == 3.0 and paper.mask_ratio_max == 0.7
    assert not DenoisingConfig().enabled


@pytest.mark.parametrize("preset", ["vqrae-tiny", "dualtoken-tiny"])
def test_denoising_changes_training_decoder_inputs_only(preset):
    options = {"noise_gamma": 3.0, "mask_ratio_max": 0.7, "code_replace_prob": 0.2}
    clean = build_tokenizer(preset, seed=0)
    noisy = build_tokenizer(preset, seed=0, denoising=options)
    assert noisy.config.denoising["noise_gamma"] == 3.0 and clean.config.denoising["noise_gamma"] == 0.0
    x = torch.randn(2, 3, 32, 32, generator=_gen(8))

    clean.eval()
    noisy.eval()  # inference: identical codes, features and reconstructions
    codes = clean.encode(x)
    for group, value in noisy.encode(x).items():
        assert torch.equal(value, codes[group])
    assert torch.equal(clean.decode(codes), noisy.decode(codes))
    assert torch.equal(clean(x).reconstruction, noisy(x).reconstruction)

    clean.train()
    noisy.train()  # training: same codes, corrupted decoder input
    torch.manual_seed(1)
    out_clean = clean(x)
    torch.manual_seed(1)
    out_noisy = noisy(x)
    for group in codes:
        assert torch.equal(out_clean.codes[group], out_noisy.codes[group])
    assert not torch.allclose(out_clean.reconstruction, out_noisy.reconstruction)
    out_noisy.reconstruction.pow(2).mean().backward()  # gradients still reach the encoder-side projection
    projection = noisy.proj_in if preset == "vqrae-tiny" else noisy.pixel_proj_in
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_code_replacement_alone_swaps_decoded_vectors():
    model = build_tokenizer("vqrae-tiny", denoising={"code_replace_prob": 1.0})
    x = torch.randn(2, 3, 32, 32, generator=_gen(9))
    model.eval()
    clean_reconstruction = model(x).reconstruction
    model.train()
    out = model(x)
    assert not torch.allclose(out.reconstruction, clean_reconstruction)
    model.set_denoising(None)
    torch.testing.assert_close(model(x).reconstruction, clean_reconstruction)


def test_code_replacement_looks_up_the_codebook_that_produced_the_codes():
    model = build_tokenizer("dualtoken-tiny", denoising={"code_replace_prob": 1.0}).train()
    quantizer = model.pixel_quantizer
    z = torch.randn(2, 64, quantizer.dim, generator=_gen(10), requires_grad=True)
    searched = quantizer.codebooks.clone()
    out = quantizer(z)
    assert not torch.allclose(quantizer.codebooks, searched)  # the EMA update / restarts moved the codebook
    assert torch.equal(out.codebook, searched)
    assert torch.equal(quantizer.lookup(out.indices, codebook=out.codebook), out.quantized.detach())

    torch.manual_seed(11)
    replaced = model._maybe_replace_codes(quantizer, out)
    torch.manual_seed(11)
    corrupted, _ = replace_codes(out.indices, quantizer.num_codes, 1.0)
    expected = searched[0][corrupted].sum(dim=-2)  # shared codebook: the sum over depths of the searched codes
    torch.testing.assert_close(replaced.quantized, expected)
    assert torch.equal(replaced.indices, out.indices)
    replaced.quantized.sum().backward()  # still straight-through to the encoder side
    torch.testing.assert_close(z.grad, torch.ones_like(z))


@pytest.mark.parametrize("encoder_type", ["siglip", "dinov2"])
def test_vqrae_mae_style_masking_drops_patches_from_a_trainable_encoder(encoder_type):
    options = {"mask_ratio_max": 0.5, "mask_ratio_min": 0.5, "encoder_drop_masked": True}  # m = 0.5 every step
    model = build_tokenizer("vqrae-tiny", encoder_type=encoder_type, denoising=options)
    x = torch.randn(2, 3, 32, 32, generator=_gen(10))
    model.eval()
    clean = model(x)
    model.train()
    stage1 = model(x)  # frozen encoder: masking happens at the decoder input only
    assert (stage1.codes["semantic"] >= 0).all()
    model.set_stage(2)
    torch.manual_seed(3)
    out = model(x)
    dropped = out.codes["semantic"][..., 0] < 0
    assert (dropped.sum(dim=1) == 32).all()  # half of the 64 patches never entered the encoder
    assert out.features.shape == (2, 32, 64)
    assert (out.codes["semantic"][~dropped] < model.config.num_codes).all()
    # Changing the pixels of a dropped patch changes nothing the encoder computes.
    row, col = divmod(int(dropped[0].nonzero()[0]), 8)
    edited = x.clone()
    edited[0, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 5.0
    torch.manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(model(edited).features, out.features)
    assert out.losses["distill"].item() == 0.0  # teacher sees the same visible patches
    (out.loss + out.reconstruction.pow(2).mean()).backward()
    assert model.denoiser.mask_token.grad.abs().sum() > 0
    assert any(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    torch.testing.assert_close(model(x).reconstruction, clean.reconstruction)
    with pytest.raises(ValueError, match="encoder_drop_masked"):
        build_tokenizer("dualtoken-tiny", denoising={"encoder_drop_masked": True})
    with pytest.raises(ValueError, match="encoder_drop_masked"):
        build_tokenizer("vqrae-tiny", encoder_type="siglip2").set_denoising(options)
