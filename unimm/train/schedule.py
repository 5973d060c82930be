"""Learning-rate schedules as `LambdaLR` multipliers (resumable through the scheduler's state dict)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, start_step: int = 0
) -> LambdaLR:
    """Warm-up + cosine for every parameter group of `optimizer`.

    `start_step` shifts the schedule so that it begins at that global step (e.g. a discriminator that starts
    when the GAN loss does); before it the factor is 0.
    """

    def factor(step: int) -> float:
        if step < start_step:
            return 0.0
        return warmup_cosine_factor(step - start_step, warmup_steps, total_steps - start_step, min_ratio)

    return LambdaLR(optimizer, factor)
