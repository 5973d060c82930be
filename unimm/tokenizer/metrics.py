"""Reconstruction and codebook metrics: PSNR, SSIM (Gaussian window, as `skimage.metrics` computes it), the edge
energy ratio (how sharp reconstructions are against their inputs: what an adversarial loss works on),
codebook utilisation and perplexity over an evaluation pass, rFID through torch-fidelity (the `[eval]` extra),
and `evaluate_tokenizer`, the evaluation loop shared by the training and evaluation programs.

Image metrics take images in [0, 1] (`[B, 3, H, W]`) and return one value per image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unimm.tokenizer.quantizers.usage import code_counts, perplexity
from unimm.tokenizer.types import CodebookSpec, VisualCodes
from unimm.utils.distributed import all_reduce_sum
from unimm.utils.imports import is_torch_fidelity_available, require

logger = logging.getLogger(__name__)


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, `[B]`: `10 log10(range^2 / MSE)` (inf for identical images)."""
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: shapes differ {tuple(prediction.shape)} vs {tuple(target.shape)}")
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def edge_energy_ratio(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image `[B]`: the energy of horizontal and vertical finite differences of `prediction` over that of
    `target` (1 = as much edge detail as the input; a blurred reconstruction scores below 1)."""
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise ValueError(f"edge_energy_ratio: expected two [B, C, H, W] tensors of one shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")

    def energy(images: torch.Tensor) -> torch.Tensor:
        images = images.double()
        dx, dy = images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]
        return dx.pow(2).flatten(1).sum(dim=1) + dy.pow(2).flatten(1).sum(dim=1)

    return (energy(prediction) / energy(target).clamp_min(1e-12)).float()


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # [size, size]


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image, `[B]`, averaged over channels.

    Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)`: an 11x11 Gaussian window (truncated at 3.5 sigma) and the
    mean over positions where the window fits inside the image.
    """
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise ValueError(
            f"ssim: expected two [B, C, H, W] tensors of one shape, got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )
    size = 2 * int(3.5 * sigma + 0.5) + 1
    if min(prediction.shape[-2:]) < size:
        raise ValueError(
            f"ssim: images of {tuple(prediction.shape[-2:])} pixels are smaller than the {size}x{size} window"
        )
    channels = prediction.shape[1]
    window = _gaussian_window(size, sigma, prediction.device).expand(channels, 1, size, size).contiguous()
    x, y = prediction.double(), target.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)  # valid positions only, per channel

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


class CodebookUsage:
    """Accumulates code histograms over an evaluation pass: per group, the fraction of the `num_codes`
    entries used at least once (utilisation) and `exp(entropy)` of the code distribution (perplexity).

    All depths of a residual group share one index space of `num_codes`, so they are counted together;
    per-depth utilisation is reported as well (`depth_utilisation`). Counts are summed across ranks in
    `compute()` when a process group is initialised.
    """

    def __init__(self, codebook_spec: CodebookSpec) -> None:
        self.spec = dict(codebook_spec)
        self.counts = {
            name: torch.zeros(group.depth, group.num_codes, dtype=torch.float64) for name, group in self.spec.items()
        }

    def update(self, codes: VisualCodes) -> None:
        for name, group in self.spec.items():
            if name not in codes:
                raise KeyError(f"codes have no group {name!r}; groups are {list(codes)}")
            group_codes = codes[name].detach()  # [B, N, D]
            if group_codes.shape[-1] != group.depth:
                raise ValueError(f"group {name!r}: codes have depth {group_codes.shape[-1]}, spec says {group.depth}")
            if group_codes.numel() and (group_codes.min() < 0 or group_codes.max() >= group.num_codes):
                raise ValueError(f"group {name!r}: codes outside [0, {group.num_codes})")
            for depth in range(group.depth):
                counts = code_counts(group_codes[..., depth].cpu(), group.num_codes).double()
                self.counts[name][depth] += counts

    def compute(self) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for name, counts in self.counts.items():
            counts = all_reduce_sum(counts.clone())
            total = counts.sum(dim=0)  # [K], all depths together
            results[name] = {
                "utilisation": float((total > 0).double().mean()),
                "perplexity": float(perplexity(total)),
                "depth_utilisation": [float((c > 0).double().mean()) for c in counts],
                "num_codes": int(total.numel()),
                "num_tokens": int(total.sum()),
            }
        return results


def compute_rfid(real_dir: str | Path, fake_dir: str | Path, inception_weights: str | Path | None) -> float:
    """Reconstruction FID between two folders of PNGs with torch-fidelity (`pip install 'unimm[eval]'`).

    `inception_weights` is a local copy of torch-fidelity's `inception-v3-compat` weights; nothing is downloaded.
    """
    require(is_torch_fidelity_available(), "torch-fidelity", "eval")
    if inception_weights is None:
        raise ValueError(
            "rFID needs local Inception weights: set inception_weights to the torch-fidelity "
            "'weights-inception-2015-12-05' file (nothing is downloaded at run time)"
        )
    weights = Path(inception_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"Inception weights not found: {weights}")
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=str(real_dir),
        input2=str(fake_dir),
        fid=True,
        cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=str(weights),
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])


def denormalize(pixel_values: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """Tokenizer-normalised pixels -> images in [0, 1] (clamped)."""
    mean_t = torch.tensor(list(mean), device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixel_values.float() * std_t + mean_t).clamp(0.0, 1.0)


@torch.no_grad()
def evaluate_tokenizer(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device | str = "cpu",
    image_writer: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One evaluation pass: mean PSNR, SSIM and edge energy ratio of the reconstructions, codebook
    utilisation/perplexity.

    `batches` yields dicts with `pixel_values` (tokenizer-normalised, as `collate_images` produces) and `ids`.
    `image_writer(ids, inputs01, reconstructions01)` is called per batch when given (e.g. to dump PNGs for
    rFID). The model is put in eval mode and restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    usage = CodebookUsage(model.codebook_spec)
    sums = torch.zeros(4, dtype=torch.float64)  # psnr, ssim, count, edge energy ratio
    mean, std = model.image_mean, model.image_std
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        pixel_values = batch["pixel_values"]
        if pixel_values.shape[0] == 0:
            continue
        pixel_values = pixel_values.to(device)
        output = model(pixel_values)
        usage.update(output.codes)
        inputs01 = denormalize(pixel_values, mean, std)
        recon01 = denormalize(output.reconstruction, mean, std)
        sums[0] += psnr(recon01, inputs01).double().sum().cpu()
        sums[1] += ssim(recon01, inputs01).double().sum().cpu()
        sums[2] += pixel_values.shape[0]
        sums[3] += edge_energy_ratio(recon01, inputs01).double().sum().cpu()
        if image_writer is not None:
            image_writer(batch.get("ids"), inputs01.cpu(), recon01.cpu())
    model.train(was_training)
    sums = all_reduce_sum(sums)
    count = int(sums[2])
    if count == 0:
        raise ValueError("evaluation saw no images (every sample was skipped or the dataset is empty)")
    codebooks = usage.compute()
    results: dict[str, Any] = {
        "num_images": count,
        "psnr": float(sums[0] / count),
        "ssim": float(sums[1] / count),
        "edge_energy_ratio": float(sums[3] / count),
        "codebooks": codebooks,
    }
    for name, stats in codebooks.items():
        results[f"{name}/utilisation"] = stats["utilisation"]
        results[f"{name}/perplexity"] = stats["perplexity"]
    if not math.isfinite(results["psnr"]):
        logger.warning("PSNR is infinite: some reconstructions are pixel-exact")
    return results
