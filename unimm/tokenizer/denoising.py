"""l-DeTok denoising of the decoder input (docs/DESIGN.md §2.4): the decoder learns to reconstruct the clean image
from a corrupted latent, so the latent space is easy for a downstream generator to denoise.

The pure functions take an explicit `torch.Generator` so their distributions can be tested statistically;
`LatentDenoiser` holds the learnable mask token and applies the configured corruptions in training only.
"""

from __future__ import annotations

import torch
from torch import nn

from unimm.tokenizer.configuration import DenoisingConfig


def _uniform(
    shape: tuple[int, ...], low: float, high: float, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device="cpu" if generator is not None else like.device)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype)


def _normal_like(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(z)
    return torch.randn(z.shape, generator=generator).to(device=z.device, dtype=z.dtype)


def sample_noise_levels(batch_size: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """tau ~ U(0, 1), one per sample: [B]."""
    return _uniform((batch_size,), 0.0, 1.0, like, generator)


def interpolative_noise(
    z: torch.Tensor, tau: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z' = (1 - tau) z + tau * gamma * eps, eps ~ N(0, I); `tau` is [B] and broadcasts over the other dims."""
    t = tau.reshape(-1, *([1] * (z.dim() - 1)))
    return (1 - t) * z + t * gamma * _normal_like(z, generator)


def additive_noise(
    z: torch.Tensor, tau: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ablation: z' = z + tau * gamma * eps."""
    t = tau.reshape(-1, *([1] * (z.dim() - 1)))
    return z + t * gamma * _normal_like(z, generator)


def sample_mask_ratio(max_ratio: float, min_ratio: float = -0.1, generator: torch.Generator | None = None) -> float:
    """m = max(0, U(min_ratio, max_ratio)), drawn once per step (the small negative bias yields unmasked steps)."""
    u = torch.rand((), generator=generator).item()
    return max(0.0, min_ratio + (max_ratio - min_ratio) * u)


def random_position_mask(
    batch_size: int,
    num_positions: int,
    ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool [B, N] with exactly round(ratio * N) True (masked) positions per sample, chosen uniformly."""
    num_masked = int(round(ratio * num_positions))
    if num_masked == 0:
        return torch.zeros(batch_size, num_positions, dtype=torch.bool, device=device)
    scores = torch.rand((batch_size, num_positions), generator=generator).to(device)
    order = scores.argsort(dim=1)
    mask = torch.zeros(batch_size, num_positions, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask


def apply_position_mask(z: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Masked positions of z [B, N, C] become `mask_token` [C]."""
    return torch.where(mask.unsqueeze(-1), mask_token.to(z.dtype).expand_as(z), z)


def replace_codes(
    indices: torch.Tensor, num_codes: int, prob: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap each code for a uniformly random one with probability `prob`: (new indices, bool replaced mask).
    The discrete analogue of an imperfect sampler's mistakes."""
    device = indices.device
    replaced = (torch.rand(indices.shape, generator=generator) < prob).to(device)
    random_codes = torch.randint(0, num_codes, indices.shape, generator=generator).to(device)
    return torch.where(replaced, random_codes, indices), replaced


class LatentDenoiser(nn.Module):
    """Corrupts the decoder-input latent [B, N, C] in training mode: noise (interpolative or additive), then
    random masking with a learnable mask token. Identity in eval mode or when `active` is False."""

    def __init__(self, latent_dim: int, config: DenoisingConfig | None = None):
        super().__init__()
        self.config = config or DenoisingConfig()
        self.mask_token = nn.Parameter(torch.zeros(latent_dim))
        self.active = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def corrupting(self) -> bool:
        return self.training and self.active

    def sample_mask(
        self,
        batch_size: int,
        num_positions: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """This step's position mask, Bool [B, N] (all False when masking is off)."""
        cfg = self.config
        ratio = sample_mask_ratio(cfg.mask_ratio_max, cfg.mask_ratio_min, generator) if cfg.mask_ratio_max > 0 else 0.0
        return random_position_mask(batch_size, num_positions, ratio, device, generator)

    def forward(
        self, z: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Noise, then masking with `mask` (Bool [B, N]) or a freshly sampled one."""
        cfg = self.config
        if not self.corrupting:
            return z
        if cfg.noise_gamma > 0:
            tau = sample_noise_levels(z.shape[0], z, generator)
            noise_fn = interpolative_noise if cfg.noise_mode == "interpolative" else additive_noise
            z = noise_fn(z, tau, cfg.noise_gamma, generator)
        if mask is None:
            mask = self.sample_mask(z.shape[0], z.shape[1], z.device, generator)
        # Applied even when nothing is masked, so the mask token always takes part in the graph (a zero
        # gradient): DDP requires every trainable parameter to receive one each step.
        return apply_position_mask(z, mask, self.mask_token)
