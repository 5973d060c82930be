"""Convolution-free ViT pixel decoder: latent tokens -> transformer -> linear head to p*p*3 pixels per token.

Pre-norm blocks with learned absolute position embeddings, the decoder VQRAE/RAE pair with a ViT encoder
(symmetric width/depth/heads by default). Blocks are `GradientCheckpointingLayer`s so the tokenizer's
`gradient_checkpointing_enable()` reaches them together with the encoder's layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] with pixels in (row, col, channel) order inside a patch."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: [B, N, p*p*C] -> [B, C, H, W]."""
    b, n, _ = patches.shape
    grid = int(math.isqrt(n))
    if grid * grid != n:
        raise ValueError(f"unpatchify needs a square number of positions, got {n}")
    p = patch_size
    x = patches.reshape(b, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * p, grid * p)


class DecoderBlock(GradientCheckpointingLayer):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"decoder_hidden_size={hidden_size} is not divisible by decoder_num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, c = hidden_states.shape
        qkv = self.qkv(self.norm1(hidden_states)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        hidden_states = hidden_states + self.proj(attn)
        return hidden_states + self.fc2(F.gelu(self.fc1(self.norm2(hidden_states)), approximate="tanh"))


class ViTDecoder(nn.Module):
    """Decodes [B, N, latent_dim] tokens on a square grid into [B, channels, grid*p, grid*p] pixels."""

    def __init__(
        self,
        latent_dim: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        num_positions: int,
        patch_size: int,
        channels: int = 3,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.input_proj = nn.Linear(latent_dim, hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.blocks = nn.ModuleList(
            [DecoderBlock(hidden_size, num_heads, intermediate_size, eps) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.head = nn.Linear(hidden_size, patch_size * patch_size * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the pixel head (for the adaptive GAN weight)."""
        return self.head.weight

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        hidden_states = self.input_proj(latent) + self.position_embedding
        for block in self.blocks:
            hidden_states = block(hidden_states)
        patches = self.head(self.norm(hidden_states))  # [B, N, p*p*C]
        return unpatchify(patches, self.patch_size, self.channels)
