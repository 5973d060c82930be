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

Two zero-shot top-1 figures, which measure different things:

- Reconstruction-based (`evaluate_zero_shot`, UniMM's): a contrastive image-text model (SigLIP or CLIP, local) classifies
  labelled images from class-name prompts, once on the originals and once on the tokenizer's reconstructions; a
  tokenizer whose pixels keep what that model sees scores the same on both. It measures the pixel branch.
- Quantised-feature (`evaluate_quantized_feature_zero_shot`, DualToken's Table 1): the tokenizer's own pooled output
  computed on its quantised semantic features (semantic codes -> projection back -> the encoder's remaining layers,
  final norm and attention-pooling head, L2-normalised: the reference's `image_features` in zero_shot.py) against
  the SigLIP text tower's class embeddings. It measures the semantic codes; no image is reconstructed. The same
  figure with the codes bypassed (the tokenizer's encoder on its own) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimm.tokenizer.base import VisualTokenizer, eval_mode

FeatureSet = dict[str, torch.Tensor]  # place ("layer", "output", "pooled") -> [B, N, C] or [B, C]
_PLACES = ("layer", "output", "pooled")  # every place `semantic_feature_pair` can compare, in a fixed order


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
    if model.initial_encoder is not None:  # the teacher, or an encoder the tokenizer never trains
        return model.initial_encoder
    raise ValueError(
        f"{type(model).__name__}: the initial encoder is unknown (its encoder may have been trained and a saved "
        "tokenizer does not keep its teacher); pass reference_encoder, e.g. the pretrained encoder it started from"
    )


def semantic_feature_pair(
    model: VisualTokenizer, reference_encoder: nn.Module, pixel_values: torch.Tensor
) -> tuple[FeatureSet, FeatureSet]:
    """(tokenizer features, initial-encoder features) at each place, for one batch of pixel_values."""
    ours = dict(zip(_PLACES, model.semantic_features(pixel_values, quantize=True)))
    theirs = dict(zip(_PLACES, model.semantic_features(pixel_values, encoder=reference_encoder, quantize=False)))
    places = [name for name, value in ours.items() if value is not None and theirs.get(name) is not None]
    return {name: ours[name] for name in places}, {name: theirs[name] for name in places}


@torch.no_grad()
def _reduce_over_ranks(agreements: dict[str, FeatureAgreement],
                       num_images: int) -> tuple[dict[str, FeatureAgreement], int]:
    """The sums of every rank's share of a sharded evaluation (no-op without a process group). Every rank reduces
    the same fixed set of places, so a rank whose shard held no image (and so saw no place) still takes part."""
    from unimm.utils.distributed import all_reduce_sum, get_world_size

    if get_world_size() == 1:
        return agreements, num_images
    empty = FeatureAgreement()
    sums = torch.tensor([[a.cosine_sum, a.vectors, a.squared_error, a.squared_reference]
                         for a in (agreements.get(name, empty) for name in _PLACES)] + [[num_images, 0, 0, 0]],
                        dtype=torch.float64)
    sums = all_reduce_sum(sums)
    reduced: dict[str, FeatureAgreement] = {}
    for name, (cosine_sum, vectors, squared_error, squared_reference) in zip(_PLACES, sums.tolist()):
        if vectors:
            reduced[name] = agreement = FeatureAgreement()
            agreement.cosine_sum, agreement.vectors = cosine_sum, int(vectors)
            agreement.squared_error, agreement.squared_reference = squared_error, squared_reference
    return reduced, int(sums[-1, 0])


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
    agreements, num_images = _reduce_over_ranks(agreements, num_images)
    if num_images == 0:
        raise ValueError("evaluate_semantic_preservation got no images")
    results: dict[str, Any] = {name: agreement.compute() for name, agreement in agreements.items()}
    results.update(semantic_layer=int(model.semantic_layer), num_images=num_images)
    return results


class ZeroShotClassifier:
    """Zero-shot classification with a contrastive image-text model (a `transformers` `SiglipModel` or `CLIPModel`):
    one text embedding per class from `prompt.format(class_name)`, an image is assigned the class whose embedding
    is most similar to its image embedding. With several prompts (a sequence), a class's embedding is the
    normalised mean of its prompts' normalised embeddings (open_clip's `build_zero_shot_classifier`, which the
    DualToken reference uses with the 80 ImageNet templates). Images come as tokenizer-normalised `pixel_values`; they are resized to
    the contrastive model's size and normalised with its `image_mean` / `image_std`."""

    def __init__(
        self, contrastive_model: nn.Module, text_tokenizer: Any, class_names: Sequence[str],
        image_mean: Sequence[float], image_std: Sequence[float], prompt: str | Sequence[str] = "a photo of a {}.",
    ) -> None:
        if len(class_names) < 2:
            raise ValueError(f"zero-shot classification needs at least two classes, got {list(class_names)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any("{}" not in p for p in prompts):
            raise ValueError(f"zero-shot prompts must each hold '{{}}' for the class name, got {prompts}")
        self.model = contrastive_model.eval()
        self.image_size = int(contrastive_model.config.vision_config.image_size)
        self.image_mean = torch.tensor(list(image_mean)).view(1, -1, 1, 1)
        self.image_std = torch.tensor(list(image_std)).view(1, -1, 1, 1)
        parameter = next(contrastive_model.parameters())
        per_prompt = []
        for template in prompts:
            text = text_tokenizer(
                [template.format(name) for name in class_names], padding="max_length", truncation=True,
                max_length=contrastive_model.config.text_config.max_position_embeddings, return_tensors="pt",
            )
            with torch.no_grad():
                features = contrastive_model.get_text_features(**text.to(parameter.device))
            per_prompt.append(F.normalize(_embedding(features).float(), dim=-1))  # [num_classes, D]
        self.text_embeddings = F.normalize(torch.stack(per_prompt).mean(dim=0), dim=-1)  # [num_classes, D]

    def predict_embeddings(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Class indices `[B]` of image embeddings `[B, D]` in the text tower's space (normalised here)."""
        if image_embeddings.shape[-1] != self.text_embeddings.shape[-1]:
            raise ValueError(
                f"image embeddings have {image_embeddings.shape[-1]} channels but the text tower's have "
                f"{self.text_embeddings.shape[-1]}: the tokenizer's encoder must be this contrastive model's vision tower"
            )
        image_embeddings = F.normalize(image_embeddings.float(), dim=-1)
        return (image_embeddings @ self.text_embeddings.to(image_embeddings.device).T).argmax(dim=-1)

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        """Class indices `[B]` of images in [0, 1] (`[B, 3, H, W]`)."""
        parameter = next(self.model.parameters())
        images = F.interpolate(images01.float(), size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False, antialias=True)
        images = (images - self.image_mean.to(images.device)) / self.image_std.to(images.device)
        features = self.model.get_image_features(pixel_values=images.to(parameter.device, parameter.dtype))
        return self.predict_embeddings(_embedding(features))


def _embedding(features: Any) -> torch.Tensor:
    """`get_*_features` return a tensor, or (newer transformers) an output whose `pooler_output` is the embedding."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def evaluate_zero_shot(
    model: nn.Module, batches: Iterable[dict[str, Any]], classifier: ZeroShotClassifier,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1 accuracy of `classifier` on the original images and on `model`'s reconstructions of them,
    and how often the two predictions agree. `batches` yields dicts with tokenizer-normalised `pixel_values` and
    integer `labels` (class indices of `classifier`'s class names). A tokenizer that keeps what the classifier
    sees scores the same on both (agreement 1)."""
    from unimm.tokenizer.metrics import denormalize

    device = torch.device(device) if device is not None else next(model.parameters()).device
    correct = torch.zeros(2, dtype=torch.long)  # original, reconstructed
    agree = count = 0
    with eval_mode(model):
        for batch in batches:
            pixel_values, labels = batch["pixel_values"].to(device), torch.as_tensor(batch["labels"]).to(device)
            if pixel_values.shape[0] == 0:
                continue
            reconstruction = model(pixel_values).reconstruction
            original = classifier.predict(denormalize(pixel_values, model.image_mean, model.image_std)).to(device)
            rebuilt = classifier.predict(denormalize(reconstruction, model.image_mean, model.image_std)).to(device)
            correct += torch.stack([(original == labels).sum(), (rebuilt == labels).sum()]).cpu()
            agree += int((original == rebuilt).sum())
            count += pixel_values.shape[0]
    if count == 0:
        raise ValueError("evaluate_zero_shot got no images")
    return {"top1_original": int(correct[0]) / count, "top1_reconstructed": int(correct[1]) / count,
            "prediction_agreement": agree / count, "num_images": count}


def quantized_feature_zero_shot_unavailable(model: nn.Module) -> str | None:
    """Why `evaluate_quantized_feature_zero_shot` cannot score `model`, or None when it can."""
    if not getattr(model, "quantizes_semantic_features", False):
        return (f"{type(model).__name__} has no quantised semantic features with a pooling head (DualToken's "
                "zero-shot metric); only the reconstruction-based figure applies")
    if not getattr(model.encoder, "use_head", False):
        return f"the {type(model).__name__}'s SigLIP encoder has no attention-pooling head (vision_use_head is off)"
    return None


@torch.no_grad()
def evaluate_quantized_feature_zero_shot(
    model: VisualTokenizer, batches: Iterable[dict[str, Any]], classifier: ZeroShotClassifier,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """DualToken's zero-shot top-1 (Table 1; see the module docstring): the pooled output on the quantised semantic
    features against `classifier`'s text embeddings ("top1_quantized_semantic_features"), the same on the encoder's
    own features with the codes bypassed ("top1_encoder_features"), and how often the two predictions agree.
    `batches` as for `evaluate_zero_shot`. The tokenizer's encoder must be the vision tower of `classifier`'s model
    (or trained from it) for the embeddings to share the text tower's space."""
    reason = quantized_feature_zero_shot_unavailable(model)
    if reason is not None:
        raise ValueError(reason)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parameter = next(model.parameters())
    correct = torch.zeros(2, dtype=torch.long)  # quantised, encoder
    agree = count = 0
    with eval_mode(model):
        for batch in batches:
            pixel_values = batch["pixel_values"].to(device=device, dtype=parameter.dtype)
            labels = torch.as_tensor(batch["labels"]).to(device)
            if pixel_values.shape[0] == 0:
                continue
            quantized = classifier.predict_embeddings(model.semantic_features(pixel_values, quantize=True)[2])
            encoder = classifier.predict_embeddings(model.semantic_features(pixel_values, quantize=False)[2])
            quantized, encoder = quantized.to(device), encoder.to(device)
            correct += torch.stack([(quantized == labels).sum(), (encoder == labels).sum()]).cpu()
            agree += int((quantized == encoder).sum())
            count += pixel_values.shape[0]
    if count == 0:
        raise ValueError("evaluate_quantized_feature_zero_shot got no images")
    return {"top1_quantized_semantic_features": int(correct[0]) / count,
            "top1_encoder_features": int(correct[1]) / count,
            "quantized_encoder_agreement": agree / count, "num_images": count}
