"""Projection blocks between an encoder's width and a code dimension (DualToken's pre- and post-quantisation maps).

`LinearProjection` is one `nn.Linear` on the raw input (cheap; UniMM's original form). `AttentionProjection` is the
block of the DualToken reference (songweii/DualToken, after VILA-U): it layer-norms its input first, which matters
on SigLIP's pre-norm residual stream, whose few outlier channels would otherwise dominate a linear map, then

    y = W_s LN_s(x) + Attn(LN_a(x))          # a linear shortcut plus multi-head attention across tokens
    y = y + GeGLU(LN_m(y))                   # GeGLU MLP on the output width

The attention works at the smaller of the two widths per head: projecting down (in > out) it has in/out heads of
dimension `out` whose outputs are averaged; projecting up (in < out) it has out/in heads of dimension `in` whose
outputs are concatenated. The key projection has no bias (a key bias adds the same score to every key of a query,
so softmax ignores it). The reference's post-quantisation (up) blocks attend causally in raster order at its newest
commit (29e7c84, modeling_rqvaesiglip.py `postquant_sem` / `postquant_pix`, `is_causal=True`) and bidirectionally at
its first (41be90e); `is_causal` chooses (DualToken's `up_projection_causal`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTION_BLOCKS = ("linear", "attention")


class GeGLUMlp(nn.Module):
    """w2(gelu(w0 x) * w1 x), hidden width `hidden_size`."""

    def __init__(self, dim: int, hidden_size: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_size)
        self.up = nn.Linear(dim, hidden_size)
        self.down = nn.Linear(hidden_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class ProjectionAttention(nn.Module):
    """Multi-head self-attention from width `in_dim` to width `out_dim` (one of them a multiple of the other)."""

    def __init__(self, in_dim: int, out_dim: int, is_causal: bool = False):
        super().__init__()
        small, large = min(in_dim, out_dim), max(in_dim, out_dim)
        if large % small != 0:
            raise ValueError(f"attention projection needs one width to divide the other, got {in_dim} -> {out_dim}")
        self.num_heads = large // small
        self.head_dim = small
        self.down = in_dim > out_dim
        self.is_causal = is_causal
        inner = self.num_heads * self.head_dim  # = large
        self.qkv = nn.Linear(in_dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.out = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)  # [B, heads, N, head_dim]
        if self.down:
            merged = attn.mean(dim=1)  # [B, N, out_dim]: head_dim == out_dim
        else:
            merged = attn.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # [B, N, out_dim]
        return self.out(merged)


class AttentionProjection(nn.Module):
    """LayerNorm-first projection block: linear shortcut + attention, then a residual GeGLU MLP (see module doc)."""

    def __init__(self, in_dim: int, out_dim: int, is_causal: bool = False, mlp_ratio: float = 2.0, eps: float = 1e-6):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.shortcut_norm = nn.LayerNorm(in_dim, eps=eps)
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.attn_norm = nn.LayerNorm(in_dim, eps=eps)
        self.attn = ProjectionAttention(in_dim, out_dim, is_causal)
        self.mlp_norm = nn.LayerNorm(out_dim, eps=eps)
        self.mlp = GeGLUMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, in_dim] -> [B, N, out_dim]
        y = self.shortcut(self.shortcut_norm(x)) + self.attn(self.attn_norm(x))
        return y + self.mlp(self.mlp_norm(y))


def build_projection(block: str, in_dim: int, out_dim: int, is_causal: bool = False) -> nn.Module:
    """`block` in PROJECTION_BLOCKS: 'linear' (nn.Linear) or 'attention' (AttentionProjection)."""
    if block == "linear":
        return nn.Linear(in_dim, out_dim)
    if block == "attention":
        return AttentionProjection(in_dim, out_dim, is_causal=is_causal)
    raise ValueError(f"projection block must be one of {PROJECTION_BLOCKS}, got {block!r}")
