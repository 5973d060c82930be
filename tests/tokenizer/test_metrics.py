"""PSNR/SSIM against scikit-image, codebook utilisation/perplexity on constructed codes, rFID errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unimm.tokenizer.metrics import CodebookUsage, compute_rfid, psnr, ssim
from unimm.tokenizer.types import CodebookGroupSpec

skimage_metrics = pytest.importorskip("skimage.metrics")


@pytest.fixture(scope="module")
def photo_pair():
    """A real photo (scikit-image sample) at 32 px and a distorted copy, as [1, 3, H, W] in [0, 1]."""
    from unimm.data.toy.sample_photos import load_sample_photos

    ((_, image),) = load_sample_photos(32, names=["astronaut"])
    clean = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    generator = torch.Generator().manual_seed(0)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(clean, 3, stride=1, padding=1, count_include_pad=False)
    return clean, noisy, blurred


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage(photo_pair):
    clean, noisy, blurred = photo_pair
    for other in (noisy, blurred):
        expected = skimage_metrics.peak_signal_noise_ratio(_to_hwc(clean), _to_hwc(other), data_range=1.0)
        assert float(psnr(other, clean)[0]) == pytest.approx(expected, abs=1e-3)
    assert math.isinf(float(psnr(clean, clean)[0]))


def test_ssim_matches_skimage_gaussian_ssim(photo_pair):
    clean, noisy, blurred = photo_pair
    for other in (noisy, blurred):
        expected = skimage_metrics.structural_similarity(
            _to_hwc(clean),
            _to_hwc(other),
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert float(ssim(other, clean)[0]) == pytest.approx(expected, abs=1e-5)
    assert float(ssim(clean, clean)[0]) == pytest.approx(1.0, abs=1e-6)
    batch = torch.cat([noisy, blurred])
    assert ssim(batch, clean.expand_as(batch)).shape == (2,)


def test_ssim_rejects_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_codebook_utilisation_and_perplexity_on_constructed_codes():
    spec = {
        "pixel": CodebookGroupSpec(num_codes=8, depth=2, code_dim=4),
        "semantic": CodebookGroupSpec(num_codes=16, depth=1, code_dim=4),
    }
    usage = CodebookUsage(spec)
    # pixel: depth 0 uses codes {0, 1, 2, 3} uniformly, depth 1 always code 7 -> 5 of 8 codes used overall.
    pixel = torch.stack([torch.tensor([[0, 1, 2, 3]]), torch.tensor([[7, 7, 7, 7]])], dim=-1)  # [1, 4, 2]
    semantic = torch.arange(16).view(2, 8, 1)  # every code once: uniform
    usage.update({"pixel": pixel, "semantic": semantic})
    usage.update({"pixel": pixel, "semantic": semantic})  # accumulates; the distribution is unchanged
    results = usage.compute()
    assert results["pixel"]["utilisation"] == pytest.approx(5 / 8)
    assert results["pixel"]["depth_utilisation"] == pytest.approx([4 / 8, 1 / 8])
    # Distribution over all depths: codes 0-3 at 1/8 each, code 7 at 1/2.
    probs = np.array([1 / 8] * 4 + [1 / 2])
    assert results["pixel"]["perplexity"] == pytest.approx(float(np.exp(-(probs * np.log(probs)).sum())))
    assert results["semantic"]["utilisation"] == 1.0
    assert results["semantic"]["perplexity"] == pytest.approx(16.0)
    assert results["semantic"]["num_tokens"] == 32


def test_codebook_usage_rejects_out_of_range_codes():
    usage = CodebookUsage({"semantic": CodebookGroupSpec(num_codes=4, depth=1, code_dim=2)})
    with pytest.raises(ValueError, match="outside"):
        usage.update({"semantic": torch.tensor([[[4]]])})
    with pytest.raises(KeyError, match="semantic"):
        usage.update({"pixel": torch.tensor([[[0]]])})


def test_rfid_needs_torch_fidelity_and_local_inception_weights(tmp_path):
    from unimm.utils.imports import is_torch_fidelity_available

    if not is_torch_fidelity_available():
        with pytest.raises(ImportError, match=r"unimm\[eval\]"):
            compute_rfid(tmp_path, tmp_path, tmp_path / "inception.pth")
    else:
        with pytest.raises(ValueError, match="Inception weights"):
            compute_rfid(tmp_path, tmp_path, None)
        with pytest.raises(FileNotFoundError, match="inception.pth"):
            compute_rfid(tmp_path, tmp_path, tmp_path / "inception.pth")


def test_edge_energy_ratio_is_one_for_the_input_and_drops_with_blur():
    from unimm.tokenizer.metrics import edge_energy_ratio

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(edge_energy_ratio(images, images), torch.ones(2))
    ratio = edge_energy_ratio(blurred, images)
    assert (ratio < 0.5).all()
    assert (edge_energy_ratio(images, blurred) > 2).all()  # sharper than the reference: above 1
