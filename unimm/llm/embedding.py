"""Visual input embeddings: discrete codes -> LLM input vectors, and continuous encoder features -> LLM input
vectors (the LLaVA `mlp2x_gelu` projector, used for VQRAE understanding)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unimm.tokenizer.types import CodebookSpec


class CodeEmbedding(nn.Module):
    """Embeddings of one codebook group's codes, summed over depth (RQ-VAE style).

    One table shared by all depths (residual quantisers with one codebook), or one table per depth
    (`per_depth=True`), stored as a single `[D * K, dim]` matrix indexed with `depth * K + code`.
    """

    def __init__(self, num_codes: int, depth: int, dim: int, per_depth: bool = False):
        super().__init__()
        self.num_codes = num_codes
        self.depth = depth
        self.per_depth = per_depth
        self.weight = nn.Parameter(torch.empty((depth if per_depth else 1) * num_codes, dim))
        nn.init.normal_(self.weight, std=0.02)

    def _flat_index(self, codes: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        if not self.per_depth:
            return codes
        depths = torch.arange(first_depth, first_depth + codes.shape[-1], device=codes.device)
        return codes + depths * self.num_codes

    def per_depth_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes [..., d]` (depths 0..d-1) -> `[..., d, dim]`, one embedding per depth (no sum)."""
        return nn.functional.embedding(self._flat_index(codes), self.weight)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes [..., D]` -> `[..., dim]`: the sum over depth of the code embeddings."""
        return self.per_depth_embeddings(codes).sum(dim=-2)


class VisualCodeEmbedding(nn.Module):
    """Per group: sum over depth of code embeddings; groups concatenated along the feature dim, then projected
    to the LLM hidden size (DualToken: pixel and semantic side by side)."""

    def __init__(self, groups: CodebookSpec, embed_dim: int, hidden_size: int, per_depth: bool = False):
        super().__init__()
        self.group_names = list(groups)
        self.tables = nn.ModuleDict(
            {name: CodeEmbedding(g.num_codes, g.depth, embed_dim, per_depth) for name, g in groups.items()}
        )
        self.proj = nn.Linear(embed_dim * len(groups), hidden_size)

    def forward(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """`codes`: group -> `[M, D_g]` (M visual positions) -> `[M, hidden]`."""
        missing = [name for name in self.group_names if name not in codes]
        if missing:
            raise KeyError(f"visual_codes lacks codebook group(s) {missing}; the model expects {self.group_names}")
        parts = [self.tables[name](codes[name]) for name in self.group_names]
        return self.proj(torch.cat(parts, dim=-1))


PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


class FeatureProjector(nn.Module):
    """LLaVA's projectors (`--mm_projector_type`): `mlp2x_gelu` (LLaVA-1.5, the default) is Linear(feature_dim,
    hidden) -> GELU -> Linear(hidden, hidden); `linear` (LLaVA-1) is Linear(feature_dim, hidden) alone.
    `unimm.llm.projector` saves and loads them in LLaVA's `mm_projector.bin` key layout."""

    def __init__(self, feature_dim: int, hidden_size: int, projector_type: str = "mlp2x_gelu"):
        super().__init__()
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"feature projector type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
        self.projector_type = projector_type
        self.linear_1 = nn.Linear(feature_dim, hidden_size)
        if projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features.to(self.linear_1.weight.dtype))
        if self.projector_type == "linear":
            return hidden
        return self.linear_2(self.act(hidden))


def image_position_index(is_image: torch.Tensor) -> torch.Tensor:
    """`is_image [B, L]` (bool) -> the index of each position inside its contiguous run of image positions
    (0, 1, ..., N-1 per image; packed rows hold several runs), 0 at other positions."""
    index = torch.arange(is_image.shape[-1], device=is_image.device).expand_as(is_image)
    previous = F.pad(is_image[..., :-1], (1, 0), value=False)
    run_start = torch.where(is_image & ~previous, index, 0).cummax(dim=-1).values
    return torch.where(is_image, index - run_start, 0)


def scatter_visual_embeddings(
    inputs_embeds: torch.Tensor, positions: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Out-of-place write of `values [M, H]` into `inputs_embeds [B, L, H]` where `positions [B, L]` is True
    (row-major order). Gradients flow to both the text embeddings and `values`."""
    return inputs_embeds.masked_scatter(positions.unsqueeze(-1), values.to(inputs_embeds.dtype))
