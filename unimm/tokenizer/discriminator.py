"""PatchGAN discriminators that score overlapping image patches as real or fake, one logit per patch.

- `arch="conv"` (pix2pix / VQGAN style): strided 4x4 convolutions with a normalisation between them.
- `arch="residual"` (the DualToken reference's, songweii/DualToken vqgan/discriminator.py): a strided 3x3
  convolution, then pre-norm residual blocks (GroupNorm -> LeakyReLU(0.2) -> strided 3x3 convolution; the shortcut
  is a 1x1 convolution of the input resized bilinearly to the block's output grid), then a 3x3 convolution to one
  logit per position. Channel counts as for "conv" (base x 2^i, capped at 8x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PatchDiscriminatorConfig:
    in_channels: int = field(default=3, metadata={"help": "Image channels."})
    base_channels: int = field(
        default=64, metadata={"help": "Channels of the first convolution (doubles per layer, capped at 8x)."}
    )
    num_layers: int = field(default=3, metadata={"help": "Number of stride-2 downsampling layers after the first one."})
    norm: str = field(default="group", metadata={"help": "Normalisation between convolutions: group | batch | none."})
    arch: str = field(
        default="conv", metadata={"help": "'conv' (pix2pix stack) or 'residual' (DualToken reference; GroupNorm)."}
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'group', 'batch' or 'none', got {kind!r}")


def _groups(channels: int) -> int:
    """32 groups where the channels allow it (the reference's), else a quarter of the channels."""
    return 32 if channels % 32 == 0 else (min(32, channels // 4) or 1)


class ResidualDown(nn.Module):
    """Pre-norm residual block of the reference's discriminator (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(in_channels), in_channels, eps=1e-6)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.leaky_relu(self.norm(x), 0.2))
        if h.shape[-2:] != x.shape[-2:]:
            x = F.interpolate(x, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return (x if self.shortcut is None else self.shortcut(x)) + h


class PatchDiscriminator(nn.Module):
    """`forward(images [B, C, H, W]) -> logits [B, 1, h, w]`: one real/fake logit per receptive-field patch."""

    def __init__(self, config: PatchDiscriminatorConfig | None = None) -> None:
        super().__init__()
        config = config or PatchDiscriminatorConfig()
        if config.num_layers < 1:
            raise ValueError(f"discriminator num_layers must be >= 1, got {config.num_layers}")
        if config.arch not in ("conv", "residual"):
            raise ValueError(f"discriminator arch must be 'conv' or 'residual', got {config.arch!r}")
        self.config = config
        if config.arch == "residual":
            self.net = self._residual(config)
            self.apply(_init_weights)
            return
        width = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, config.num_layers + 1):
            previous, width = width, config.base_channels * min(2**i, 8)
            stride = 1 if i == config.num_layers else 2  # last layer keeps resolution, as in pix2pix
            layers += [
                nn.Conv2d(previous, width, kernel_size=4, stride=stride, padding=1, bias=config.norm == "none"),
                _norm(config.norm, width),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    @staticmethod
    def _residual(config: PatchDiscriminatorConfig) -> nn.Sequential:
        width = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, config.num_layers + 1):
            previous, width = width, config.base_channels * min(2**i, 8)
            layers.append(ResidualDown(previous, width, stride=1 if i == config.num_layers else 2))
        layers.append(nn.Conv2d(width, 1, kernel_size=3, stride=1, padding=1))
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
