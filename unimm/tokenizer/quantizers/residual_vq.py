"""Residual VQ with EMA codebooks and dead-code restart (RQ-VAE style; DualToken's quantizer).

Depth i quantizes the residual left by depths < i, so a position is coded by `depth` indices whose codes sum
to its approximation. Codebooks receive no gradient: they track an exponential moving average of the vectors
assigned to them (Laplace-smoothed counts), and a code whose EMA count falls below `restart_threshold` is moved
onto a random residual of the current batch (distinct residuals for distinct codes). Under `torch.distributed` the
per-step counts and sums are all-reduced and the restart vectors come from rank 0, so every rank holds the same
codebooks.

When the EMA step runs: by default once per forward, after all depths have searched the codebooks as they were at
its start (the DualToken reference's semantic quantizer, `RQBottleneck_ema`). With `ema_per_depth=True` each depth
updates the codebook right after its own search (count and sum decay, renormalisation, restarts from that depth's
residuals), so depth i+1 searches the codebook depth i has just moved (the reference's pixel quantizer,
`RQBottleneck` of `quantizations.py`, whose `VQEmbedding.forward` updates inside the residual loop). With one
codebook shared by all depths this is `depth` EMA steps per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimm.tokenizer.quantizers.base import Quantizer
from unimm.tokenizer.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES, nearest_code
from unimm.tokenizer.quantizers.usage import UsageWindow, perplexity
from unimm.tokenizer.types import QuantizerOutput
from unimm.utils import distributed


def draw_distinct(count: int, population: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`count` random indices in [0, population), LongTensor [count]: without replacement when
    count <= population; otherwise whole permutations back to back, so each index is drawn
    floor(count / population) or ceil(count / population) times."""
    if population < 1:
        raise ValueError(f"draw_distinct needs population >= 1, got {population}")
    rounds = -(-count // population)
    draws = [torch.randperm(population, device=device) for _ in range(rounds)]
    return torch.cat(draws)[:count] if draws else torch.empty(0, dtype=torch.long, device=device)


class ResidualVQ(Quantizer):
    """Residual vector quantizer with EMA codebooks.

    Args:
        num_codes: codes per codebook K.
        dim: code (and input) dimension d.
        depth: number of residual steps D; indices are `[..., D]`.
        decay: EMA decay of the per-code counts and sums.
        eps: Laplace smoothing constant for the counts.
        restart_threshold: a code whose EMA count is below this is restarted from the current batch (0 disables).
        shared_codebook: one codebook for all depths (True) or one per depth.
        beta: weight of the commitment loss `mean_d ||z - sg(sum_{i<=d} q_i)||^2`.
        memory_budget_bytes: bound on the temporaries of the nearest-code search (see `search.nearest_code`).
        usage_window: number of recent training steps over which `stats["utilisation"]` counts used codes.
        init_scale: standard deviation of the initial random codebook (codes unused at the first training
            steps are restarted from data anyway).
        ema_per_depth: run the EMA step inside the residual loop, depth by depth (see the module docstring).
    """

    _float32_buffers = ("codebooks", "ema_count", "ema_sum")

    def __init__(
        self,
        num_codes: int,
        dim: int,
        depth: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 1.0,
        shared_codebook: bool = True,
        beta: float = 0.25,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        usage_window: int = 100,
        init_scale: float = 1.0,
        ema_per_depth: bool = False,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1 or depth < 1:
            raise ValueError(
                f"ResidualVQ needs num_codes, dim and depth >= 1, got num_codes={num_codes}, dim={dim}, depth={depth}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ResidualVQ decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.dim = dim
        self.depth = depth
        self.decay = decay
        self.eps = eps
        self.restart_threshold = restart_threshold
        self.shared_codebook = shared_codebook
        self.beta = beta
        self.memory_budget_bytes = memory_budget_bytes
        self.ema_per_depth = ema_per_depth
        groups = 1 if shared_codebook else depth
        codebooks = torch.randn(groups, num_codes, dim) * init_scale
        self.register_buffer("codebooks", codebooks)  # [G, K, d]
        # Counts start at 1 with sums equal to the codes, so an unused code keeps its position as both decay.
        self.register_buffer("ema_count", torch.ones(groups, num_codes))  # [G, K]
        self.register_buffer("ema_sum", codebooks.clone())  # [G, K, d]
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.usage = UsageWindow(num_codes, usage_window, groups=depth)

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    def codebook(self, depth_index: int) -> torch.Tensor:
        """The codebook used at depth `depth_index` (0-based), float32 [K, d]."""
        if not 0 <= depth_index < self.depth:
            raise IndexError(f"ResidualVQ has depth {self.depth}; depth_index {depth_index} is out of range")
        return self.codebooks[0 if self.shared_codebook else depth_index]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.reshape(-1, self.dim).float()  # [M, d]
            residual = z_flat.detach()
            approximation = None
            all_indices, residuals, losses = [], [], []
            per_depth = self.training and self.ema_per_depth
            searched = self.codebooks.detach()
            if self.training:
                searched = searched.clone()  # the EMA update and restarts below change the buffer in place
            restarts = torch.zeros((), dtype=torch.long, device=z.device)
            for d in range(self.depth):
                codebook = self.codebook(d)
                indices = nearest_code(residual, codebook, self.memory_budget_bytes)  # [M]
                codes = F.embedding(indices, codebook)  # a copy: the per-depth update below leaves it as searched
                approximation = codes if approximation is None else approximation + codes
                losses.append(F.mse_loss(z_flat, approximation))
                all_indices.append(indices)
                residuals.append(residual)
                if per_depth:
                    restarts = restarts + self._ema_update_depth(d, indices, residual)
                residual = residual - codes
            indices = torch.stack(all_indices, dim=-1)  # [M, D]
            loss = self.beta * torch.stack(losses).mean()
            # Straight-through: value is exactly the summed codes, gradient is the identity to z.
            quantized = approximation + (z_flat - z_flat.detach())
            counts = self._depth_counts(indices)  # [D, K], local to this rank
            if self.training:
                counts = distributed.all_reduce_sum(counts)
                if not per_depth:
                    restarts = self._ema_update(indices, torch.stack(residuals), counts)
        stats = self._stats(counts, restarts)
        quantized = quantized.to(z.dtype).reshape(z.shape)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(*z.shape[:-1], self.depth),
            loss=loss,
            stats=stats,
            codebook=searched,  # [G, K, d]
        )

    def _depth_counts(self, indices: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.depth, device=indices.device) * self.num_codes
        flat = (indices + offsets).reshape(-1)
        return torch.bincount(flat, minlength=self.depth * self.num_codes).float().view(self.depth, self.num_codes)

    @torch.no_grad()
    def _ema_update(self, indices: torch.Tensor, residuals: torch.Tensor, depth_counts: torch.Tensor) -> torch.Tensor:
        """One EMA step. indices [M, D]; residuals [D, M, d] (the inputs of each depth); depth_counts [D, K]
        already summed over ranks. Returns the number of restarted codes."""
        groups, num_codes = self.num_codebooks, self.num_codes
        group_of_depth = torch.arange(self.depth, device=indices.device) if groups > 1 else None
        # Per-code sums of assigned residuals, per codebook group.
        if groups == 1:
            counts = depth_counts.sum(dim=0, keepdim=True)  # [1, K]
            sums = torch.zeros(1, num_codes, self.dim, device=residuals.device)
            sums[0].index_add_(0, indices.t().reshape(-1), residuals.reshape(-1, self.dim))
            pooled = residuals.reshape(1, -1, self.dim)  # restart candidates: all depths' residuals
        else:
            counts = depth_counts  # [D, K]
            flat = (indices.t() + group_of_depth[:, None] * num_codes).reshape(-1)  # [D*M]
            sums = torch.zeros(groups * num_codes, self.dim, device=residuals.device)
            sums.index_add_(0, flat, residuals.reshape(-1, self.dim))
            sums = sums.view(groups, num_codes, self.dim)
            pooled = residuals  # [D, M, d]
        sums = distributed.all_reduce_sum(sums)

        self._ema_step(slice(None), counts, sums)
        if self.restart_threshold <= 0:
            return torch.zeros((), dtype=torch.long, device=indices.device)
        return self._restart_dead_codes(pooled)

    @torch.no_grad()
    def _ema_update_depth(self, depth_index: int, indices: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """One EMA step of the codebook of depth `depth_index` from that depth alone: indices [M], residual [M, d]
        (its input). Counts and sums are summed over ranks. Returns the number of restarted codes."""
        group = 0 if self.shared_codebook else depth_index
        counts = torch.bincount(indices, minlength=self.num_codes).float()[None]  # [1, K]
        sums = torch.zeros(1, self.num_codes, self.dim, device=residual.device)
        sums[0].index_add_(0, indices, residual)
        counts, sums = distributed.all_reduce_sum(counts), distributed.all_reduce_sum(sums)
        self._ema_step(slice(group, group + 1), counts, sums)
        if self.restart_threshold <= 0:
            return torch.zeros((), dtype=torch.long, device=indices.device)
        candidates = residual[None].expand(self.num_codebooks, -1, -1)  # every group draws from this depth
        return self._restart_dead_codes(candidates, only_group=group)

    def _ema_step(self, groups: slice, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Decay the EMA counts [G', K] and sums [G', K, d] of codebook `groups` towards this step's, then set
        those codebooks to the Laplace-smoothed means."""
        ema_count, ema_sum = self.ema_count[groups], self.ema_sum[groups]  # views: updated in place
        ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = ema_count.sum(dim=-1, keepdim=True)
        smoothed = (ema_count + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebooks[groups] = ema_sum / smoothed.unsqueeze(-1)

    def _restart_dead_codes(self, candidates: torch.Tensor, only_group: int | None = None) -> torch.Tensor:
        """Move codes whose EMA count is below the threshold onto random candidate vectors ([G, M, d]) of this
        batch, distinct ones within a codebook (two dead codes restarted onto one vector would split its
        assignments and die again); `only_group` limits this to one codebook. Rank 0 decides and draws; the
        other ranks receive its choice."""
        dead = self.ema_count < self.restart_threshold  # [G, K]
        if only_group is not None:
            dead[torch.arange(dead.shape[0], device=dead.device) != only_group] = False
        dead = distributed.broadcast(dead.to(torch.uint8), src=0).bool()
        num_dead = int(dead.sum())
        if num_dead == 0:
            return torch.zeros((), dtype=torch.long, device=dead.device)
        replacements = torch.empty(num_dead, self.dim, device=self.codebooks.device)
        if distributed.get_rank() == 0:
            group_of_dead = dead.nonzero()[:, 0]  # [num_dead], codebook group of each dead code
            picks = torch.empty_like(group_of_dead)
            for group in group_of_dead.unique().tolist():
                slots = (group_of_dead == group).nonzero()[:, 0]
                picks[slots] = draw_distinct(slots.numel(), candidates.shape[1], candidates.device)
            replacements.copy_(candidates[group_of_dead, picks])
        distributed.broadcast(replacements, src=0)
        self.codebooks[dead] = replacements
        self.ema_count[dead] = self.restart_threshold
        self.ema_sum[dead] = replacements * self.restart_threshold
        self.restarts_total += num_dead
        return torch.tensor(num_dead, device=dead.device)

    @torch.no_grad()
    def _stats(self, depth_counts: torch.Tensor, restarts: torch.Tensor) -> dict[str, torch.Tensor]:
        batch_utilisation = (depth_counts > 0).float().mean(dim=-1)  # [D]
        if self.training:
            self.usage.update(depth_counts)
            utilisation = self.usage.utilisation()  # [D]
        else:
            utilisation = batch_utilisation
        depth_perplexity = perplexity(depth_counts)  # [D]
        stats = {
            "utilisation": utilisation.mean(),
            "batch_utilisation": batch_utilisation.mean(),
            "perplexity": depth_perplexity.mean(),
            "restarts": restarts,
            "restarts_total": self.restarts_total.clone(),
        }
        for d in range(self.depth):
            stats[f"utilisation/depth{d}"] = utilisation[d]
            stats[f"perplexity/depth{d}"] = depth_perplexity[d]
        return stats

    def embed_codes(self, indices: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Per-depth code vectors: indices [..., k] (k <= depth, the first k depths) -> float32 [..., k, d], from
        the current codebooks or from `codebook` [G, K, d] (a `QuantizerOutput.codebook`)."""
        self._check_indices(indices)
        codebooks = self.codebooks if codebook is None else codebook
        if codebooks.shape != self.codebooks.shape:
            raise ValueError(f"codebook must be {tuple(self.codebooks.shape)}, got {tuple(codebooks.shape)}")
        if indices.dim() < 1 or not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(
                f"ResidualVQ indices must be [..., k] with 1 <= k <= depth={self.depth}, got shape {tuple(indices.shape)}"
            )
        indices = indices.long()
        if self.shared_codebook:
            return F.embedding(indices, codebooks[0])
        k = indices.shape[-1]
        offsets = torch.arange(k, device=indices.device) * self.num_codes
        return F.embedding(indices + offsets, codebooks[:k].reshape(-1, self.dim))

    def lookup(self, indices: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the codes of the first k depths: indices [..., k] (k <= depth) -> float32 [..., d].

        With k = depth this reproduces `forward(z).quantized` in eval mode (and in training mode with
        `codebook=out.codebook`, except with `ema_per_depth`, where depths after the first searched codebooks
        updated within the forward); with k < depth it gives the partial reconstruction after k residual steps."""
        per_depth = self.embed_codes(indices, codebook)  # [..., k, d]
        total = per_depth[..., 0, :]
        for d in range(1, per_depth.shape[-2]):  # same summation order as forward, so the values match exactly
            total = total + per_depth[..., d, :]
        return total
