"""Visual input embeddings: discrete codes -> LLM input vectors, and continuous encoder features -> LLM input
vectors (the LLaVA `mlp2x_gelu` projector, used for VQRAE understanding)."""

from __future__ import annotations

import math

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


IMAGE_POSITION_TYPES = ("learned", "sincos_2d")
SINCOS_TEMPERATURE = 10000.0  # the usual lowest frequency 1/10000 (MAE's); `image_position_sincos_temperature`


def sincos_2d_table(side: int, dim: int, temperature: float = SINCOS_TEMPERATURE) -> torch.Tensor:
    """`[side * side, dim]`: the fixed 2D sine-cosine embedding of each cell of a `side x side` grid in raster
    order (MAE's 2D sin-cos): the first half of the channels encodes the row, the second the column, each as sines
    then cosines of the coordinate at `dim / 4` frequencies from 1 down to 1/temperature."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** -(torch.arange(quarter, dtype=torch.float64, device="cpu") / quarter)
    coords = torch.arange(side, dtype=torch.float64, device="cpu")
    angles = coords[:, None] * omega[None]                                     # [side, dim/4]
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)                     # [side, dim/2]
    rows = axis[:, None, :].expand(side, side, dim // 2)
    cols = axis[None, :, :].expand(side, side, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim).float()


class SinCosImagePositionEmbedding(nn.Module):
    """The position inside a square image as a fixed 2D sine-cosine embedding of its (row, column), times a learned
    per-channel gain (initialised small, like the learned tables beside it). Unlike a learned row per position,
    the same offset between two cells is the same rotation of their features wherever they lie, so what the LLM
    learns of a shape's layout at one place in the image carries over to another.

    Drop-in for the learned `nn.Embedding(N, hidden)`: `num_embeddings`, `weight` (the `[N, hidden]` table) and
    `forward(index)`."""

    def __init__(self, num_positions: int, dim: int, init_gain: float = 0.02,
                 temperature: float = SINCOS_TEMPERATURE):
        super().__init__()
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(f"a 2D sin-cos image position embedding needs a square grid, got {num_positions} "
                             "positions (num_image_positions); use image_position_embedding_type='learned'")
        self.num_embeddings = num_positions
        self.side, self.dim, self.init_gain, self.temperature = side, dim, init_gain, temperature
        self.gain = nn.Parameter(torch.full((dim,), init_gain))
        # Rebuilt on first use rather than kept as a buffer: a model built on the meta device (from_pretrained)
        # would otherwise hold an uninitialised table.
        self._table: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self._table is None or self._table.device != self.gain.device:
            self._table = sincos_2d_table(self.side, self.dim, self.temperature).to(self.gain.device)
        return self._table.to(self.gain.dtype) * self.gain

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight[index]


def build_image_position_embedding(kind: str, num_positions: int, dim: int,
                                   temperature: float = SINCOS_TEMPERATURE) -> nn.Module:
    """The image position embedding of `UniMMConfig.image_position_embedding_type` (`temperature`: the sin-cos
    table's, `image_position_sincos_temperature`)."""
    if kind == "learned":
        return nn.Embedding(num_positions, dim)
    if kind == "sincos_2d":
        return SinCosImagePositionEmbedding(num_positions, dim, temperature=temperature)
    raise ValueError(f"image_position_embedding_type must be one of {IMAGE_POSITION_TYPES}, got {kind!r}")


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
