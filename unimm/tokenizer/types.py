"""Types shared by the quantizers, the tokenizer models and the LLM (the interface of docs/DESIGN.md §2.6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

# Codebook-group name -> LongTensor [B, N, D] (N spatial positions, D residual depth).
VisualCodes = dict[str, torch.Tensor]


@dataclass
class QuantizerOutput:
    """What every quantizer's `forward(z)` returns.

    quantized: same shape as `z`, straight-through (forward value = codebook vectors, gradient flows to `z`).
    indices:   LongTensor; `z.shape[:-1]` for single-codebook quantizers (SimVQ),
               `z.shape[:-1] + (depth,)` for residual quantizers.
    loss:      scalar commitment/codebook loss (already weighted by beta).
    stats:     detached scalars for logging, e.g. "utilisation", "perplexity".
    codebook:  detached codebook state the search used (`quantizer.lookup(indices, codebook=...)` reads it). A
               training forward may move the codebook after the search (EMA update, restarts); this is the one
               that produced `indices`.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    codebook: torch.Tensor | None = None


@dataclass(frozen=True)
class CodebookGroupSpec:
    """One codebook group as the LLM sees it: `num_codes` entries per depth, `depth` codes per position."""

    num_codes: int
    depth: int
    code_dim: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# Group name ("semantic", "pixel") -> spec. Ordered: the LLM concatenates groups in this order.
CodebookSpec = dict[str, CodebookGroupSpec]


def codebook_spec_to_dict(spec: CodebookSpec) -> dict[str, dict[str, int]]:
    return {name: group.to_dict() for name, group in spec.items()}


def codebook_spec_from_dict(data: dict[str, dict[str, int]]) -> CodebookSpec:
    return {name: CodebookGroupSpec(**group) for name, group in data.items()}
