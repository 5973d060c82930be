"""Which tokenizer parameters AdamW must not decay, decided once here for every trainer.

Besides vectors (biases, norm scales, mask tokens), two kinds of matrices are excluded:
- SimVQ's codebook projection `W` (and its bias). Every code is `W c`, so decaying `W` shrinks the whole codebook
  towards zero at every step; the SimVQ paper trains `W` without decay.
- Positional tables (the ViT decoder's position embedding, the encoder's position embeddings). They are additive
  lookup tables, not linear maps: weight decay pulls them towards zero (no position information), the reason
  MAE/timm list `pos_embed` under `no_weight_decay`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from unimm.tokenizer.quantizers import SimVQ

# A parameter whose dotted name has a component containing one of these is a positional table.
POSITION_TABLE_MARKERS = ("position_embedding", "pos_embed")


def is_position_table(name: str) -> bool:
    """`decoder.position_embedding`, `encoder.embeddings.position_embedding.weight` (SigLIP), DINOv2's
    `embeddings.position_embeddings`: True; `decoder.blocks.0.qkv.weight`: False."""
    return any(marker in part for part in name.split(".") for marker in POSITION_TABLE_MARKERS)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters that get no weight decay."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, SimVQ):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters())
    for name, param in model.named_parameters():
        if param.ndim < 2 or is_position_table(name):
            names.add(name)
    return names


def split_weight_decay(
    model: nn.Module, params: Iterable[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) parameters of `params` (a subset of `model`'s, order kept), by `no_weight_decay_names`.
    Parameters that are not `model`'s are decided by shape alone (vectors are not decayed)."""
    excluded = no_weight_decay_names(model)
    no_decay_ids = {id(param) for name, param in model.named_parameters() if name in excluded}
    decay, no_decay = [], []
    for param in params:
        (no_decay if id(param) in no_decay_ids or param.ndim < 2 else decay).append(param)
    return decay, no_decay
