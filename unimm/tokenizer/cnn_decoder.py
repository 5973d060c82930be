"""Convolutional (VQGAN-style) pixel decoder: latent tokens on a square grid -> image, DualToken's reference decoder.

    latent [B, N, d] -> input projection to `input_width` (linear, or the LayerNorm-first attention block)
      -> grid [B, input_width, g, g] -> bilinear resize to the decoder's base grid S / 2^(L-1) when g differs
         (the reference maps SigLIP's 27x27 grid to 24x24 for 384 px with 5 levels)
      -> post-quantisation ResNet block (1x1 then 3x3 conv) to `in_channels`
      -> conv_in -> mid (ResNet, attention, ResNet)
      -> L levels from coarse to fine: `num_res_blocks + 1` ResNet blocks (+ attention at `attn_resolutions`),
         then nearest x2 upsampling and a 3x3 conv, except after the finest level
      -> GroupNorm, SiLU, 3x3 conv to RGB.

Channel widths are `channels * channel_mult[level]`. GroupNorm uses 32 groups where the width allows (fewer for the
narrow widths of tiny test configs). ResNet blocks are `GradientCheckpointingLayer`s, so the tokenizer's
`gradient_checkpointing_enable()` reaches them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from unimm.tokenizer.projections import build_projection


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(GradientCheckpointingLayer):
    """GN-SiLU-conv twice with a residual (1x1 conv when the width changes); `first_kernel` 1 for the
    post-quantisation block, 3 elsewhere."""

    def __init__(self, in_channels: int, out_channels: int, first_kernel: int = 3):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, first_kernel, padding=first_kernel // 2)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each [B, HW, C]
        attn = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.out(attn.transpose(1, 2).reshape(b, c, h, w))


class CNNDecoder(nn.Module):
    """Decodes [B, N, latent_dim] tokens on a square grid into [B, out_channels, image_size, image_size] pixels."""

    def __init__(
        self,
        latent_dim: int,
        image_size: int,
        input_width: int,
        in_channels: int,
        channels: int,
        channel_mult: list[int] | tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: list[int] | tuple[int, ...] = (),
        input_block: str = "linear",
        out_channels: int = 3,
        input_causal: bool = True,
    ):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult or min(channel_mult) < 1 or channels < 1 or num_res_blocks < 0:
            raise ValueError(
                f"CNN decoder needs channels >= 1, a non-empty channel_mult of positive ints and num_res_blocks >= 0; "
                f"got channels={channels}, channel_mult={channel_mult}, num_res_blocks={num_res_blocks}"
            )
        upsamplings = len(channel_mult) - 1
        if image_size % 2**upsamplings != 0:
            raise ValueError(
                f"image_size={image_size} is not divisible by 2^{upsamplings} (the {len(channel_mult)} levels of "
                f"cnn_decoder_channel_mult={channel_mult})"
            )
        self.image_size = image_size
        self.base_grid = image_size // 2**upsamplings
        # The reference's post-quantisation attention block is causal in raster order at HEAD (bidirectional at its
        # first commit 41be90e); `input_causal` chooses.
        self.input_proj = build_projection(input_block, latent_dim, input_width, is_causal=input_causal)
        self.post_quant = ResnetBlock(input_width, in_channels, first_kernel=1)
        width = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(width, width), SpatialAttention(width), ResnetBlock(width, width)])
        self.levels = nn.ModuleList()
        resolution = self.base_grid
        for level in reversed(range(len(channel_mult))):
            out_width = channels * channel_mult[level]
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, out_width))
                width = out_width
                if resolution in attn_resolutions:
                    blocks.append(SpatialAttention(width))
            if level != 0:
                blocks.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                blocks.append(nn.Conv2d(width, width, 3, padding=1))
                resolution *= 2
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last convolution (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        b, n, _ = latent.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"CNN decoder needs a square number of positions, got {n}")
        hidden = self.input_proj(latent)  # [B, N, input_width]
        hidden = hidden.transpose(1, 2).reshape(b, -1, grid, grid)  # [B, input_width, g, g]
        if grid != self.base_grid:
            hidden = F.interpolate(hidden, size=(self.base_grid, self.base_grid), mode="bilinear", align_corners=False)
        hidden = self.conv_in(self.post_quant(hidden))
        for module in self.mid:
            hidden = module(hidden)
        for level in self.levels:
            hidden = level(hidden)
        return self.conv_out(F.silu(self.norm_out(hidden)))  # [B, 3, S, S]
