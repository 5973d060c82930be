"""Exponential moving average of a model's weights, kept outside the model and saved separately."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param` for every floating-point parameter after each step.

    Buffers (e.g. EMA codebooks, which are already averages) are copied, not averaged. The shadow is kept in
    float32 on the parameters' device. `state_dict()` / `load_state_dict()` round-trip it for resume;
    `copy_to(model)` writes the averaged weights into a model of the same structure.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: param.detach().float().clone()
            for name, param in model.named_parameters()
            if param.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters with the averages (buffers are left as they are)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
