"""SimVQ: nearest code among `W(C)`, a learnable linear map of a frozen random codebook (VQRAE's quantizer).

Only `W` (a `dim x dim` linear layer with bias) is trained; because every code moves with `W`, codes never go
stale, which is why SimVQ keeps full codebook use at K = 16384 without restarts. `C ~ N(0, 1/dim)` is a
buffer so that it is saved with the weights and a reload gives the same codes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unimm.tokenizer.quantizers.base import Quantizer
from unimm.tokenizer.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES, nearest_code
from unimm.tokenizer.quantizers.usage import UsageWindow, code_counts, perplexity
from unimm.tokenizer.types import QuantizerOutput
from unimm.utils import distributed

BetaOn = Literal["commitment", "codebook"]


class SimVQ(Quantizer):
    """SimVQ quantizer.

    Args:
        num_codes: codebook size K.
        dim: code (and input) dimension d.
        beta: weight of one of the two loss terms, chosen by `beta_on`.
        beta_on: "commitment" (default, as in the SimVQ paper): `beta * ||sg(c) - z||^2 + ||c - sg(z)||^2`;
            "codebook" (as the VQRAE write-up states it): `||sg(c) - z||^2 + beta * ||c - sg(z)||^2`.
        memory_budget_bytes: bound on the temporaries of the nearest-code search (see `search.nearest_code`).
        usage_window: number of recent training steps over which `stats["utilisation"]` counts used codes.
    """

    _float32_buffers = ("frozen_codebook",)

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        beta_on: BetaOn = "commitment",
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        usage_window: int = 100,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"SimVQ needs num_codes >= 1 and dim >= 1, got num_codes={num_codes}, dim={dim}")
        if beta_on not in ("commitment", "codebook"):
            raise ValueError(f"SimVQ beta_on must be 'commitment' or 'codebook', got {beta_on!r}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.beta_on = beta_on
        self.memory_budget_bytes = memory_budget_bytes
        self.register_buffer("frozen_codebook", torch.randn(num_codes, dim) * dim**-0.5)
        self.codebook_proj = nn.Linear(dim, dim, bias=True)
        self.usage = UsageWindow(num_codes, usage_window)

    @property
    def codebook(self) -> torch.Tensor:
        """The effective codes `W(C)`, float32 [K, d] (differentiable w.r.t. W), whatever the module dtype.

        Without autograd (inference: encode/decode/lookup) the product is cached until W, b or C change, since at
        paper size (16384 x 1536) it costs ~77 GFLOP per call."""
        weight, bias = self.codebook_proj.weight, self.codebook_proj.bias
        key = None
        if not torch.is_grad_enabled() or not weight.requires_grad:
            key = (weight.data_ptr(), weight._version, bias.data_ptr(), bias._version,
                   self.frozen_codebook.data_ptr(), self.frozen_codebook._version, weight.device)
            cached = getattr(self, "_codebook_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        with torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            codebook = F.linear(self.frozen_codebook.float(), weight.float(), bias.float())
        if key is not None:
            codebook = codebook.detach()
            self._codebook_cache = (key, codebook)
        return codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.reshape(-1, self.dim).float()  # [M, d]
            codebook = self.codebook
            indices = nearest_code(z_flat, codebook, self.memory_budget_bytes)
            codes = F.embedding(indices, codebook)  # [M, d], gradient reaches W
            commitment = F.mse_loss(z_flat, codes.detach())
            codebook_term = F.mse_loss(codes, z_flat.detach())
            if self.beta_on == "commitment":
                loss = self.beta * commitment + codebook_term
            else:
                loss = commitment + self.beta * codebook_term
            # Straight-through: the value is exactly the code (z - sg(z) is 0), the gradient is the identity to z.
            quantized = codes.detach() + (z_flat - z_flat.detach())
        quantized = quantized.to(z.dtype).reshape(z.shape)
        indices = indices.reshape(z.shape[:-1])
        return QuantizerOutput(
            quantized=quantized, indices=indices, loss=loss, stats=self._stats(indices), codebook=codebook.detach()
        )

    @torch.no_grad()
    def _stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = code_counts(indices, self.num_codes)
        if self.training:
            # Summed over ranks, as ResidualVQ's counts are: utilisation is that of the global batch. Eval may run
            # on one rank only, so no collective there.
            counts = distributed.all_reduce_sum(counts)
        batch_utilisation = (counts > 0).float().mean()
        if self.training:
            self.usage.update(counts)
            utilisation = self.usage.utilisation()[0]
        else:
            utilisation = batch_utilisation
        return {
            "utilisation": utilisation,
            "batch_utilisation": batch_utilisation,
            "perplexity": perplexity(counts),
        }

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Codes `W(C)[indices]`: indices [...] -> float32 vectors [..., d], from the current `W(C)` or from
        `codebook` [K, d] (a `QuantizerOutput.codebook`)."""
        self._check_indices(indices)
        if codebook is not None and codebook.shape != (self.num_codes, self.dim):
            raise ValueError(f"codebook must be ({self.num_codes}, {self.dim}), got {tuple(codebook.shape)}")
        return F.embedding(indices.long(), self.codebook if codebook is None else codebook)
