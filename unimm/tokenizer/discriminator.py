"""PatchGAN discriminator (pix2pix / VQGAN style): a stack of strided 4x4 convolutions that scores
overlapping image patches as real or fake, one logit per patch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PatchDiscriminatorConfig:
    in_channels: int = field(default=3, metadata={"help": "Image channels."})
    base_channels: int = field(
        default=64, metadata={"help": "Channels of the first convolution (doubles per layer, capped at 8x)."}
    )
    num_layers: int = field(default=3, metadata={"help": "Number of stride-2 downsampling layers after the first one."})
    norm: str = field(default="group", metadata={"help": "Normalisation between convolutions: group | batch | none."})


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be 'group', 'batch' or 'none', got {kind!r}")


class PatchDiscriminator(nn.Module):
    """`forward(images [B, C, H, W]) -> logits [B, 1, h, w]`: one real/fake logit per receptive-field patch."""

    def __init__(self, config: PatchDiscriminatorConfig | None = None) -> None:
        super().__init__()
        config = config or PatchDiscriminatorConfig()
        if config.num_layers < 1:
            raise ValueError(f"discriminator num_layers must be >= 1, got {config.num_layers}")
        self.config = config
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
