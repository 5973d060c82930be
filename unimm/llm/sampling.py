"""Turning logits into codes: top-k / top-p filtering, sampling, and classifier-free guidance. Shared by the
sequential decoders (`unimm.llm.generation`) and speculative Jacobi decoding (`unimm.llm.jacobi`), which must draw
from exactly the same distribution.
"""

from __future__ import annotations

import torch

__all__ = ["filter_logits", "guide", "sample_logits"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (to -inf) all but the `top_k` largest logits and outside the smallest set with probability >= `top_p`."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token is always kept)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """`logits [M, K]` -> codes `[M]`. `temperature <= 0` is greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """`[2B, K]` logits of `[cond; uncond]` -> `[B, K]` guided logits `u + s (c - u)`, written as `c + (s-1)(c-u)`
    so that `s = 1` returns the conditional logits exactly. Without guidance the logits pass through."""
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return cond + (cfg_scale - 1.0) * (cond - uncond)
