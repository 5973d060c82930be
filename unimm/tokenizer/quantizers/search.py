"""Nearest-code search shared by the quantizers: squared L2 in matmul form, chunked over rows.

For K = 16384 codes and 100k+ vectors a full `[M, K]` float32 distance matrix is several GiB, so rows are
processed in chunks sized from a memory budget. Within a chunk `||c||^2 - 2 z.c` comes out of one `addmm`
into a single `[rows, K]` block; `||z||^2` is constant along a row, so it does not change the argmin and is
only added back when the caller asks for distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024**2

_FP32_BYTES = 4
_INDEX_BYTES = 8


@dataclass
class SearchPlan:
    """How `nearest_code` splits a search, and the bytes of the temporaries it allocates.

    `fixed_bytes` are allocated once (codebook norms, plus float32 copies of inputs that were not float32);
    `block_bytes` are the per-chunk temporaries: the `[rows, K]` distance block, the chunk's min values and
    argmin indices, a float32 copy of the chunk when the input was not float32, and the chunk's squared norms
    when distances are returned. BLAS workspace (a few MiB for large GEMMs) is not included.
    """

    num_vectors: int
    num_codes: int
    dim: int
    rows_per_chunk: int
    num_chunks: int
    fixed_bytes: int
    block_bytes: int

    @property
    def peak_extra_bytes(self) -> int:
        return self.fixed_bytes + self.block_bytes


def plan_search(
    num_vectors: int,
    num_codes: int,
    dim: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    cast_vectors: bool = False,
    cast_codebook: bool = False,
    with_distances: bool = False,
) -> SearchPlan:
    """Choose the chunk size so that fixed + per-chunk temporaries fit in `memory_budget_bytes`."""
    fixed = num_codes * _FP32_BYTES + (num_codes * dim * _FP32_BYTES if cast_codebook else 0)
    per_row = num_codes * _FP32_BYTES + _FP32_BYTES + _INDEX_BYTES + (dim * _FP32_BYTES if cast_vectors else 0)
    if with_distances:  # ||z||^2 of the chunk
        per_row += _FP32_BYTES
    rows = (memory_budget_bytes - fixed) // per_row
    if rows < 1:
        raise ValueError(
            f"memory_budget_bytes={memory_budget_bytes} is too small for a nearest-code search over "
            f"{num_codes} codes of dim {dim}: it needs at least {fixed + per_row} bytes (one row)"
        )
    rows = int(min(rows, max(num_vectors, 1)))
    num_chunks = -(-num_vectors // rows) if num_vectors else 0
    if num_chunks:  # balance the chunks (e.g. 2 x 2048 rows rather than 4095 + 1)
        rows = -(-num_vectors // num_chunks)
    return SearchPlan(num_vectors, num_codes, dim, rows, num_chunks, fixed, rows * per_row)


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    return_distances: bool = False,
    codebook_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codebook row (squared L2) for every row of `z`.

    z: [M, d]; codebook: [K, d]. Returns LongTensor [M], and with `return_distances` also the float32 squared
    distances [M]. Always computed in float32 with autocast off, whatever the input dtype. No gradient.
    `codebook_sq_norm` ([K], float32) may be passed when the caller already has it.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code expects z [M, d] and codebook [K, d] with the same d; got {tuple(z.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    num_vectors, dim = z.shape
    num_codes = codebook.shape[0]
    plan = plan_search(
        num_vectors,
        num_codes,
        dim,
        memory_budget_bytes,
        cast_vectors=z.dtype != torch.float32,
        cast_codebook=codebook.dtype != torch.float32,
        with_distances=return_distances,
    )
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        codebook = codebook.detach().float()
        if codebook_sq_norm is None:
            # A norm reduction, not pow(2).sum(): that would materialise a [K, d] temporary.
            codebook_sq_norm = torch.linalg.vector_norm(codebook, dim=1).square()
        sq_norm_row = codebook_sq_norm.float().unsqueeze(0)  # [1, K]
        codebook_t = codebook.t()
        indices = torch.empty(num_vectors, dtype=torch.long, device=z.device)
        distances = torch.empty(num_vectors, dtype=torch.float32, device=z.device) if return_distances else None
        for start in range(0, num_vectors, plan.rows_per_chunk):
            stop = min(start + plan.rows_per_chunk, num_vectors)
            chunk = z[start:stop].detach().float()
            # ||c||^2 - 2 z.c, one [rows, K] block.
            block = torch.addmm(sq_norm_row, chunk, codebook_t, beta=1.0, alpha=-2.0)
            min_values, min_indices = block.min(dim=1)
            del block
            indices[start:stop] = min_indices
            if distances is not None:
                distances[start:stop] = (min_values + torch.linalg.vector_norm(chunk, dim=1).square()).clamp_min_(0.0)
    if return_distances:
        return indices, distances
    return indices
