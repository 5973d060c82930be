"""LPIPS, PatchGAN hinge losses, the adaptive GAN weight and the composed reconstruction loss."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from unimm.tokenizer.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from unimm.tokenizer.losses import (
    ReconstructionLoss,
    ReconstructionLossConfig,
    adaptive_gan_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    self_distillation_loss,
    semantic_loss,
    to_lpips_range,
)
from unimm.tokenizer.lpips import LPIPS, LPIPS_CHANNELS, VGG16_LAYOUT


@pytest.fixture(autouse=True)
def single_thread():
    """Small convolutions on a shared 2-core machine run faster without a second, spinning intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchvision_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under torchvision's vgg16 key names, including the classifier (which LPIPS ignores)."""
    generator = torch.Generator().manual_seed(seed)
    state, index, in_ch = {}, 0, 3
    for item in VGG16_LAYOUT:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = (
            torch.randn(item, in_ch, 3, 3, generator=generator) * (2 / (9 * in_ch)) ** 0.5
        )
        state[f"features.{index}.bias"] = torch.randn(item, generator=generator) * 0.01
        in_ch, index = item, index + 2
    state["classifier.0.weight"] = torch.randn(8, 8, generator=generator)
    state["classifier.0.bias"] = torch.zeros(8)
    return state


def _lpips_heads_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(LPIPS_CHANNELS)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(_torchvision_vgg16_state_dict(), folder / "vgg16.pth")
    torch.save(_lpips_heads_state_dict(), folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth"


@pytest.fixture(scope="module")
def pretrained_lpips(lpips_files):
    return LPIPS(*lpips_files)


def test_lpips_loads_torchvision_and_lpips_weights_by_key(lpips_files, pretrained_lpips):
    vgg_path, lin_path = lpips_files
    lpips = pretrained_lpips
    vgg = torch.load(vgg_path, weights_only=True)
    heads = torch.load(lin_path, weights_only=True)
    assert lpips.is_pretrained
    # The first and last convolutions of the stack carry torchvision's indices 0 and 28.
    torch.testing.assert_close(lpips.features[0].weight, vgg["features.0.weight"])
    torch.testing.assert_close(lpips.features[28].bias, vgg["features.28.bias"])
    torch.testing.assert_close(lpips.lins[3].weight, heads["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_rejects_a_state_dict_with_missing_or_misshapen_keys():
    lpips = LPIPS()
    state = _torchvision_vgg16_state_dict()
    del state["features.10.weight"]
    with pytest.raises(KeyError, match=r"features\.10\.weight"):
        lpips.load_vgg_state_dict(state)
    heads = _lpips_heads_state_dict()
    heads["lin2.model.1.weight"] = torch.ones(1, 7, 1, 1)
    with pytest.raises(ValueError, match="lin2"):
        lpips.load_lpips_heads(heads)


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(pretrained_lpips):
    torch.manual_seed(0)
    lpips = pretrained_lpips
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-6)
    distances = [
        float(lpips((images + s * torch.randn_like(images)).clamp(-1, 1), images).mean()) for s in (0.05, 0.2, 0.6)
    ]
    assert distances[0] > 0
    assert distances[0] < distances[1] < distances[2]


def test_lpips_without_weights_warns_once_and_still_orders_distortions(caplog, lpips_files):
    from unimm.utils import logging as unimm_logging

    unimm_logging._warned.clear()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        lpips = LPIPS()
        LPIPS(*lpips_files[:1])  # VGG weights without the heads: still not a real LPIPS
    warnings = [r for r in caplog.records if "without pretrained weights" in r.getMessage()]
    assert len(warnings) == 1
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    small = lpips(images + 0.05 * torch.randn_like(images), images)
    large = lpips(images + 0.5 * torch.randn_like(images), images)
    assert 0 < float(small) < float(large)


def test_lpips_passes_gradients_to_its_inputs():
    lpips = LPIPS()
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    lpips(x, torch.zeros_like(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hinge_losses_match_their_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    expected_d = 0.5 * (torch.tensor([0.0, 0.5, 2.0]).mean() + torch.tensor([0.0, 1.0, 2.5]).mean())
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(hinge_generator_loss(fake), -fake.mean())


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    out = layer(x)
    rec = out.pow(2).mean()
    gen = -(3.0 * out).mean()
    weight = adaptive_gan_weight(rec, gen, layer.weight)
    rec_grad = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(gen, layer.weight, retain_graph=True)[0]
    torch.testing.assert_close(weight, rec_grad.norm() / (gen_grad.norm() + 1e-4))
    assert not weight.requires_grad
    # Scaling the generator loss by k scales the weight by ~1/k.
    weight_scaled = adaptive_gan_weight(rec, 10 * gen, layer.weight)
    torch.testing.assert_close(weight_scaled * 10, weight, rtol=1e-3, atol=1e-6)


def test_patch_discriminator_scores_patches():
    disc = PatchDiscriminator(PatchDiscriminatorConfig(base_channels=8, num_layers=2))
    logits = disc(torch.randn(3, 3, 32, 32))
    assert logits.shape[0] == 3 and logits.shape[1] == 1 and logits.shape[-1] > 1
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(PatchDiscriminatorConfig(norm="layer"))


def test_self_distillation_and_semantic_losses():
    a = torch.randn(2, 5, 8)
    assert float(self_distillation_loss(a, a)) == 0.0
    assert float(semantic_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = a + 0.1
    torch.testing.assert_close(self_distillation_loss(a, b), F.mse_loss(a, b))
    expected = F.mse_loss(a, -a) + 2.0  # cosine -1
    torch.testing.assert_close(semantic_loss(a, -a), expected)


def test_reconstruction_loss_composes_l2_lpips_and_gan_from_its_start_step():
    torch.manual_seed(0)
    config = ReconstructionLossConfig(
        l2_weight=1.0, perceptual_weight=0.5, gan_weight=0.1, gan_start_step=3, disc_base_channels=8, disc_num_layers=2
    )
    loss = ReconstructionLoss(config, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    decoder = torch.nn.Conv2d(3, 3, 1)
    inputs = torch.rand(1, 3, 16, 16) * 2 - 1
    recon = decoder(inputs + 0.3 * torch.randn_like(inputs))

    before, logs = loss.generator_loss(inputs, recon, step=2, last_layer=decoder.weight)
    expected = F.mse_loss(recon, inputs) + 0.5 * loss.lpips(recon, inputs).mean()  # SigLIP range is already [-1, 1]
    torch.testing.assert_close(before, expected)
    assert "gan_g" not in logs and not loss.gan_active(2)

    after, logs = loss.generator_loss(inputs, recon, step=3, last_layer=decoder.weight)
    torch.testing.assert_close(after, expected + 0.1 * logs["gan_adaptive_weight"] * logs["gan_g"])
    after.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the generator step leaves D alone
    d_loss, d_logs = loss.discriminator_loss(inputs, recon)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert float(d_logs["gan_d"]) > 0


def test_lpips_range_undoes_imagenet_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images01 = torch.rand(1, 3, 4, 4)
    normalised = (images01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(to_lpips_range(normalised, mean, std), images01 * 2 - 1)


def test_required_pretrained_lpips_refuses_to_start_without_weights(lpips_files):
    config = ReconstructionLossConfig(perceptual_weight=1.0, require_pretrained_lpips=True, lpips_vgg_path=None)
    with pytest.raises(ValueError, match="require_pretrained_lpips.*lpips_vgg_path and lpips_lin_path"):
        ReconstructionLoss(config, (0.5,) * 3, (0.5,) * 3)
    vgg, lin = lpips_files
    ok = ReconstructionLoss(
        ReconstructionLossConfig(require_pretrained_lpips=True, lpips_vgg_path=str(vgg), lpips_lin_path=str(lin)),
        (0.5,) * 3,
        (0.5,) * 3,
    )
    assert ok.lpips is not None and ok.lpips.is_pretrained


def test_lpips_loads_the_real_v01_heads_through_the_users_path_option(real_lpips_heads_path, lpips_files):
    """The lpips wheel's own vgg.pth loads through `--lpips_lin_path`, the option the recipes document."""
    from transformers import HfArgumentParser

    from unimm.tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig, check_lpips_weights

    vgg_path, _ = lpips_files  # the VGG16 trunk stays a local torchvision-format file (none ships in a wheel)
    (config,) = HfArgumentParser(ReconstructionLossConfig).parse_args_into_dataclasses(
        ["--lpips_vgg_path", str(vgg_path), "--lpips_lin_path", str(real_lpips_heads_path),
         "--require_pretrained_lpips", "true"])
    loss = ReconstructionLoss(config, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert loss.lpips is not None and loss.lpips.is_pretrained
    heads = torch.load(real_lpips_heads_path, map_location="cpu", weights_only=True)
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    for i, (lin, channels) in enumerate(zip(loss.lpips.lins, LPIPS_CHANNELS)):
        torch.testing.assert_close(lin.weight, heads[f"lin{i}.model.1.weight"], rtol=0, atol=0)
        assert lin.weight.shape == (1, channels, 1, 1) and bool((lin.weight >= 0).all())
        assert not torch.allclose(lin.weight, torch.full_like(lin.weight, 1.0 / channels))  # not the fallback
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss.lpips(x, x)) == 0.0 and float(loss.lpips(x, x.flip(-1))) > 0.0
    # a real recipe still refuses to start without the VGG16 trunk
    trunkless = ReconstructionLossConfig(lpips_lin_path=str(real_lpips_heads_path), require_pretrained_lpips=True)
    with pytest.raises(ValueError, match="lpips_vgg_path"):
        check_lpips_weights(trunkless)
