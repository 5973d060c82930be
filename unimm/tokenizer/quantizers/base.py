"""Behaviour shared by the quantizers: one interface, and codebook state that stays float32."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unimm.tokenizer.types import QuantizerOutput


class Quantizer(nn.Module):
    """`forward(z [..., dim]) -> QuantizerOutput`; `lookup(indices) -> vectors` reproduces `quantized` in eval.

    Buffers named in `_float32_buffers` (frozen or EMA codebooks) keep float32 when the module is cast with
    `.to(torch.bfloat16)` / `.half()`: rounding an EMA codebook to bf16 every step would stall its updates, and
    a frozen random codebook cast to bf16 would no longer be the saved one. Devices still follow the cast.
    """

    _float32_buffers: tuple[str, ...] = ()

    num_codes: int
    dim: int

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        """Code vectors of `indices`, from the current codebook or from `codebook` (a `QuantizerOutput.codebook`)."""
        raise NotImplementedError

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        kept = {name: self._buffers[name] for name in self._float32_buffers if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return result

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.dim}], got shape {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError(f"{type(self).__name__} got an empty input of shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects floating-point inputs, got {z.dtype}")

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"{type(self).__name__}.lookup expects integer code indices, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"{type(self).__name__}.lookup: code indices must lie in [0, {self.num_codes}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
