"""Codebook usage statistics: utilisation over a sliding window of steps, perplexity of a batch.

Everything here is a `bincount` over the indices plus O(K) bookkeeping, so it is cheap enough to run on every
training step. Values are detached tensors (no host sync), ready for `QuantizerOutput.stats`.
"""

from __future__ import annotations

import torch
from torch import nn


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code occurs in `indices` (any shape); float32 [num_codes]."""
    return torch.bincount(indices.reshape(-1), minlength=num_codes).float()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by `counts` [..., K]; 0 when nothing was counted."""
    total = counts.sum(dim=-1, keepdim=True)
    probs = counts / total.clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))


class UsageWindow(nn.Module):
    """Fraction of codes used at least once in the last `window` recorded steps, for `groups` codebooks.

    Stores, per code, the last step at which it was used (O(K) memory rather than a `[window, K]` history).
    The state is a non-persistent buffer: it is a statistic, not part of the model weights.
    """

    def __init__(self, num_codes: int, window: int, groups: int = 1) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"usage_window must be >= 1, got {window}")
        self.num_codes = num_codes
        self.window = window
        self.register_buffer("last_used", torch.full((groups, num_codes), -1, dtype=torch.long), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)

    def update(self, counts: torch.Tensor) -> None:
        """Record one step; `counts` [groups, K] (or [K] for one group) are the per-code counts of that step."""
        counts = counts.reshape(self.last_used.shape)
        self.step += 1
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))

    def utilisation(self) -> torch.Tensor:
        """Per group, the fraction of codes used in the last `window` steps; float32 [groups]."""
        recent = (self.last_used > self.step - self.window) & (self.last_used > 0)
        return recent.float().mean(dim=-1)

    def reset(self) -> None:
        self.last_used.fill_(-1)
        self.step.zero_()
