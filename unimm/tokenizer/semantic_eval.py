"""Semantic preservation: how close a tokenizer's semantic features stay to those of the frozen initial encoder.

Keeping the vision encoder's semantics is why DualToken and VQRAE exist, so evaluation compares, image by image:

- DualToken: the hidden state at `semantic_layer` after the semantic codes (projection, ResidualVQ, projection
  back) against the initial encoder's hidden state there; then the encoder output and the pooled output computed
  on top of each (the quantised path through the tokenizer's remaining layers, the initial encoder's own).
- VQRAE: the encoder output (`encode_features`, the understanding path; its semantic layer is the last one) and the
  pooled output, of the tokenizer's encoder against the initial encoder.

Two numbers per place:
- `cosine`: mean over images and tokens of the cosine similarity along channels (1 = same directions);
- `relative_mse`: sum ||f - f0||^2 / sum ||f0||^2 over all images (0 = identical; 1 = as far as predicting zeros).

The initial encoder is the tokenizer's teacher when it has one (training with a trainable encoder), the
tokenizer's own encoder when that was never trained (DualToken with `train_encoder=False`), or given explicitly
(a trained checkpoint does not carry its initial encoder: pass the pretrained encoder it started from).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimm.tokenizer.base import VisualTokenizer, eval_mode
from unimm.tokenizer.dualtoken import DualToken
from unimm.tokenizer.encoders import EncoderAccess

FeatureSet = dict[str, torch.Tensor]  # place ("layer", "output", "pooled") -> [B, N, C] or [B, C]


class FeatureAgreement:
    """Running cosine similarity and relative MSE between predicted and reference features of one place."""

    def __init__(self) -> None:
        self.cosine_sum = 0.0
        self.vectors = 0
        self.squared_error = 0.0
        self.squared_reference = 0.0

    def update(self, features: torch.Tensor, reference: torch.Tensor) -> None:
        if features.shape != reference.shape:
            raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference.shape)} differ")
        features, reference = features.detach().double(), reference.detach().double()
        cosine = F.cosine_similarity(features, reference, dim=-1)  # one value per token (or pooled vector)
        self.cosine_sum += float(cosine.sum())
        self.vectors += cosine.numel()
        self.squared_error += float((features - reference).pow(2).sum())
        self.squared_reference += float(reference.pow(2).sum())

    def compute(self) -> dict[str, float]:
        if self.vectors == 0:
            raise ValueError("no features were compared")
        return {
            "cosine": self.cosine_sum / self.vectors,
            "relative_mse": self.squared_error / max(self.squared_reference, 1e-30),
        }


def resolve_reference_encoder(model: VisualTokenizer, reference_encoder: nn.Module | None = None) -> nn.Module:
    """The frozen initial encoder to compare with (see the module docstring); ValueError when none is known."""
    if reference_encoder is not None:
        return reference_encoder
    if model.teacher is not None:
        return model.teacher
    if isinstance(model, DualToken) and not model.config.train_encoder:
        return model.encoder  # never trained: it is the initial encoder
    raise ValueError(
        f"{type(model).__name__}: the initial encoder is unknown (its encoder may have been trained and a saved "
        "tokenizer does not keep its teacher); pass reference_encoder, e.g. the pretrained encoder it started from"
    )


def _encoder_outputs(access: EncoderAccess, pixel_values: torch.Tensor) -> FeatureSet:
    hidden = access.run_layers(access.embed(pixel_values), 0, access.num_layers)
    output, pooled = access.finalize(hidden)
    return {"output": output} if pooled is None else {"output": output, "pooled": pooled}


def semantic_feature_pair(
    model: VisualTokenizer, reference_encoder: nn.Module, pixel_values: torch.Tensor
) -> tuple[FeatureSet, FeatureSet]:
    """(tokenizer features, initial-encoder features) at each place, for one batch of pixel_values."""
    if isinstance(model, DualToken):
        names = ("layer", "output", "pooled")
        ours = dict(zip(names, model.semantic_features(pixel_values, quantize=True)))
        theirs = dict(zip(names, model.semantic_features(pixel_values, encoder=reference_encoder, quantize=False)))
    else:  # VQRAE: the understanding path is the continuous encoder output; its semantic layer is the last one
        ours = _encoder_outputs(model._encoder_access, pixel_values)
        theirs = _encoder_outputs(EncoderAccess(reference_encoder), pixel_values)
    places = [name for name, value in ours.items() if value is not None and theirs.get(name) is not None]
    return {name: ours[name] for name in places}, {name: theirs[name] for name in places}


@torch.no_grad()
def evaluate_semantic_preservation(
    model: VisualTokenizer,
    batches: Iterable[torch.Tensor | dict[str, Any]],
    reference_encoder: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Cosine similarity and relative MSE of the tokenizer's semantic features against the frozen initial encoder's,
    per place: {"layer" (DualToken), "output", "pooled" (when the encoder pools): {"cosine", "relative_mse"}},
    plus "semantic_layer" and "num_images". `batches` yields pixel_values or dicts holding them."""
    reference = resolve_reference_encoder(model, reference_encoder)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parameter = next(model.parameters())
    reference_was_training = reference.training
    reference.to(device=device, dtype=parameter.dtype).eval()
    agreements: dict[str, FeatureAgreement] = {}
    num_images = 0
    try:
        with eval_mode(model):
            for batch in batches:
                pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
                if pixel_values.shape[0] == 0:
                    continue
                pixel_values = pixel_values.to(device=device, dtype=parameter.dtype)
                ours, theirs = semantic_feature_pair(model, reference, pixel_values)
                for name in ours:
                    agreements.setdefault(name, FeatureAgreement()).update(ours[name], theirs[name])
                num_images += pixel_values.shape[0]
    finally:
        reference.train(reference_was_training)
    if num_images == 0:
        raise ValueError("evaluate_semantic_preservation got no images")
    semantic_layer = model.config.semantic_layer if isinstance(model, DualToken) else model.encoder_num_layers
    results: dict[str, Any] = {name: agreement.compute() for name, agreement in agreements.items()}
    results.update(semantic_layer=int(semantic_layer), num_images=num_images)
    return results
