"""Depth-transformer head: predicts the D residual codes of one codebook group at one visual position
(RQ-Transformer style), conditioned only on the LLM hidden state that precedes the position.

Sequence fed to the head at a visual target (length D):
    depth 1:   proj(h)                              h = LLM hidden state of the previous position
    depth d>1: sum of the embeddings of codes 1..d-1 (teacher forcing in training, sampled codes in generation)
plus a learned depth position embedding; a small causal transformer; a classifier per depth (or shared).

The blocks are written here (pre-norm, `scaled_dot_product_attention`, GELU MLP) rather than taken from
`torch.nn.TransformerEncoderLayer` or a `transformers` decoder: `nn.MultiheadAttention` reads its output
projection's weight without calling that submodule, which DeepSpeed ZeRO-3 cannot gather; and a HF decoder
would bring a vocabulary table and rotary embeddings this D <= 8 token sequence does not need.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unimm.llm.embedding import CodeEmbedding
from unimm.tokenizer.types import CodebookGroupSpec


class DepthBlock(nn.Module):
    """Pre-norm causal self-attention + GELU MLP."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"depth head hidden size {hidden_size} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [M, heads, T, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class DepthTransformerHead(nn.Module):
    """The head of one codebook group (e.g. the pixel head or the semantic head)."""

    def __init__(self, group: CodebookGroupSpec, llm_hidden_size: int, hidden_size: int, num_layers: int = 3,
                 num_heads: int = 4, intermediate_size: int | None = None, dropout: float = 0.0,
                 shared_classifier: bool = False, per_depth_embeddings: bool = False):
        super().__init__()
        self.num_codes = group.num_codes
        self.depth = group.depth
        self.shared_classifier = shared_classifier
        self.input_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.code_embedding = CodeEmbedding(group.num_codes, group.depth, hidden_size, per_depth_embeddings)
        self.depth_embedding = nn.Parameter(torch.empty(group.depth, hidden_size))
        self.blocks = nn.ModuleList(
            DepthBlock(hidden_size, num_heads, intermediate_size or 4 * hidden_size, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        # [D or 1, K, hidden]: one classifier per depth, or one shared by all depths
        self.classifier = nn.Parameter(torch.empty(1 if shared_classifier else group.depth, group.num_codes, hidden_size))
        nn.init.normal_(self.depth_embedding, std=0.02)
        nn.init.normal_(self.classifier, std=0.02)

    def _inputs(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """`hidden [M, H_llm]`, `prefix_codes [M, d]` -> head inputs `[M, d + 1, hidden]`."""
        first = self.input_proj(hidden).unsqueeze(1)
        if prefix_codes.shape[1] == 0:
            x = first
        else:
            # input at depth j+1 is the sum of the embeddings of codes 1..j (a running sum over depth)
            cumulative = self.code_embedding.per_depth_embeddings(prefix_codes).cumsum(dim=1)
            x = torch.cat([first, cumulative.to(first.dtype)], dim=1)
        return x + self.depth_embedding[: x.shape[1]].to(x.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _classify(self, states: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        """`states [M, T, hidden]` at depths first_depth.. -> logits `[M, T, K]`."""
        length = states.shape[1]
        if self.shared_classifier:
            return states @ self.classifier[0].t()
        weight = self.classifier[first_depth : first_depth + length]  # [T, K, hidden]
        return torch.einsum("mth,tkh->mtk", states, weight)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every depth: `hidden [M, H_llm]`, `codes [M, D]` -> `[M, D, K]`."""
        if codes.shape[-1] != self.depth:
            raise ValueError(f"depth head expects codes of depth {self.depth}, got shape {tuple(codes.shape)}")
        return self._classify(self._encode(self._inputs(hidden, codes[:, :-1])))

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """Logits `[M, K]` of the code at depth `prefix_codes.shape[1] + 1`, given the codes sampled so far.
        Recomputes the (at most D-token) head sequence: cheaper than managing a cache for it."""
        depth = prefix_codes.shape[1]
        if depth >= self.depth:
            raise ValueError(f"all {self.depth} depths of this group are already sampled")
        states = self._encode(self._inputs(hidden, prefix_codes))
        return self._classify(states[:, -1:], first_depth=depth)[:, 0]
