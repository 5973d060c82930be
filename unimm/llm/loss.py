"""Joint loss of `UniMMForCausalLM`: text next-token cross-entropy + per-group, per-depth visual cross-entropy.

Targets follow the HF convention (labels aligned with `input_ids`, shifted here). A label that is a text id
is predicted by the LM head from the previous position's hidden state; a label equal to `image_token_id` is a
visual target whose codes (`visual_codes[g]` at that position, `[D_g]`) are predicted by group g's depth head
from the same previous hidden state.

Normalisation (so that gradient accumulation with HF Trainer's `num_items_in_batch` is exact): every
supervised label counts as one item, text or visual, exactly as `Trainer` counts `labels[..., 1:] != -100`.
A visual item's loss is `visual_loss_weight * sum over groups of (mean over depth of the code CE)`.
    total = (sum text CE + sum visual item losses) / (num_items_in_batch or number of supervised labels)
All cross-entropies are computed in fp32. The LM head only runs on hidden states of text targets; the depth heads'
logits are computed a chunk of targets at a time, fused with their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from unimm.llm.layout import IGNORE_INDEX


@dataclass
class LossParts:
    """What the joint loss returns. `text_loss` / `visual_losses` are per-target means (for logging);
    `loss` is the normalised total used for backward."""

    loss: torch.Tensor
    text_loss: torch.Tensor | None = None
    visual_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    visual_depth_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> [D]
    num_text_targets: int = 0
    num_visual_targets: int = 0


def _touch(module: nn.Module, *args) -> torch.Tensor:
    """Run `module` on an empty batch and return a zero that depends on all its parameters, so that every
    rank's backward covers the same parameters (DDP) even when a batch has no target of this kind."""
    return module(*args).sum() * 0.0


def joint_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    depth_heads: nn.ModuleDict | None = None,
    visual_codes: dict[str, torch.Tensor] | None = None,
    image_token_id: int | None = None,
    code_token_range: tuple[int, int] | None = None,
    flat_group: str | None = None,
    visual_loss_weight: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> LossParts:
    """Compute the joint loss.

    hidden_states:     `[B, L, H]` last hidden states of the LLM.
    labels:            `[B, L]` (HF convention, shifted here).
    depth_heads:       group -> `DepthTransformerHead` (absent in flat mode).
    visual_codes:      group -> `[B, L, D_g]`, -1 where there is no image position.
    image_token_id:    the label value marking visual targets (None in flat mode).
    code_token_range:  flat mode: `[start, stop)` of the code-token block; those text targets are reported as
                       the visual loss of `flat_group` (they are still LM-head targets).
    """
    hidden = hidden_states[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    supervised = targets != IGNORE_INDEX
    visual_mask = targets == image_token_id if (image_token_id is not None and depth_heads) else None
    text_mask = supervised & ~visual_mask if visual_mask is not None else supervised

    zero = hidden_states.new_zeros((), dtype=torch.float32)
    total = zero
    parts = LossParts(loss=zero)

    # Text targets: gather hidden states first, so the [tokens, vocab] logits exist only where supervised.
    text_targets = targets[text_mask]
    parts.num_text_targets = int(text_targets.numel())
    if parts.num_text_targets:
        text_logits = lm_head(hidden[text_mask]).float()
        text_ce = F.cross_entropy(text_logits, text_targets, reduction="none")
        total = total + text_ce.sum()
        if code_token_range is not None:
            is_code = (text_targets >= code_token_range[0]) & (text_targets < code_token_range[1])
            if is_code.any():
                parts.visual_losses[flat_group] = text_ce[is_code].mean().detach()
                parts.num_visual_targets = int(is_code.sum())
            if (~is_code).any():
                parts.text_loss = text_ce[~is_code].mean().detach()
        else:
            parts.text_loss = text_ce.mean().detach()
    else:
        total = total + _touch(lm_head, hidden[:0, 0])

    if visual_mask is not None:
        num_visual = int(visual_mask.sum())
        parts.num_visual_targets = num_visual
        visual_hidden = hidden[visual_mask]  # [M, H]
        for name, head in depth_heads.items():
            if num_visual == 0:
                total = total + _touch(head, visual_hidden, hidden.new_zeros((0, head.depth), dtype=torch.long))
                continue
            if visual_codes is None or name not in visual_codes:
                raise ValueError(f"labels hold {num_visual} visual targets but visual_codes lacks group {name!r}")
            codes = visual_codes[name][:, 1:].to(hidden.device)[visual_mask]  # [M, D]
            if (codes < 0).any() or (codes >= head.num_codes).any():
                raise ValueError(f"visual_codes[{name!r}] at visual targets must be in [0, {head.num_codes}); got "
                                 f"min {int(codes.min())}, max {int(codes.max())} (labels mark a position as "
                                 "image_token_id where no codes were given?)")
            # Chunked and fused with its gradient: the [M, D, K] logits are never all held (see depth_head.py).
            weighted, depth_sums = head(visual_hidden, codes, loss_scale=visual_loss_weight)
            total = total + weighted
            parts.visual_losses[name] = depth_sums.mean() / num_visual
            parts.visual_depth_losses[name] = depth_sums / num_visual

    num_items = parts.num_text_targets + (parts.num_visual_targets if visual_mask is not None else 0)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(num_items, 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device, torch.float32)
    parts.loss = total / denominator
    return parts
