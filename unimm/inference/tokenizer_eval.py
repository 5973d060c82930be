"""Evaluate a trained visual tokenizer over a dataset: PSNR, SSIM, codebook utilisation and perplexity (and rFID when
torch-fidelity and local Inception weights are available), written as JSON, plus a PNG grid of input |
reconstruction pairs. "semantic" holds the semantic preservation against the initial encoder
(`unimm.tokenizer.semantic_eval`): known for a DualToken whose encoder was never trained, otherwise given by
`reference_encoder` (the pretrained encoder the tokenizer started from); without one it says why it was skipped.
"zero_shot" (with `zero_shot_model` and a `zero_shot_dataset` of class subfolders) holds two zero-shot figures
(`unimm.tokenizer.semantic_eval`): `top1_original` / `top1_reconstructed`, a local SigLIP/CLIP classifying the
original images and the tokenizer's reconstructions (the pixel branch); and, for a DualToken whose encoder is that
SigLIP's vision tower, `top1_quantized_semantic_features`, DualToken's own metric (Table 1): its pooled quantised
semantic features against the text tower, beside `top1_encoder_features` (codes bypassed). The program is
`unimm.cli.eval_tokenizer`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.tokenizer.metrics import compute_rfid, denormalize, evaluate_tokenizer
from unimm.train.tokenizer.args import ImageSourceArguments
from unimm.train.tokenizer.data import comparison_grid, eval_batches, image_from_tensor, load_records
from unimm.utils.config import config_field
from unimm.utils.errors import model_folder
from unimm.utils.runtime import resolve_device

if TYPE_CHECKING:
    from unimm.tokenizer.base import VisualTokenizer


@dataclass
class TokenizerEvalArguments(ImageSourceArguments):
    """The evaluation's options: the image source the trainer reads too (`ImageSourceArguments`: dataset, image_key,
    split, image_size, num_samples, allow_outside_image_folder, max_bad_fraction), then its own."""

    num_samples: int = config_field(64, "Number of images of the `shapes` shortcut.")  # fewer than training's
    model_path: str | None = config_field(None, "Saved tokenizer directory (save_pretrained).")
    max_images: int | None = config_field(None, "Evaluate at most this many images.")
    batch_size: int = config_field(16, "Images per batch.")
    output_json: str | None = config_field(None, "Where to write the metrics (JSON).")
    grid_path: str | None = config_field(None, "PNG grid of input|reconstruction (default: next to the JSON).")
    num_grid_images: int = config_field(16, "Images in the comparison grid.")
    reference_encoder: str | None = config_field(
        None, "Local HF checkpoint of the initial (pretrained) encoder, for the semantic metrics."
    )
    zero_shot_model: str | None = config_field(
        None,
        "Local SigLIP/CLIP checkpoint (image and text towers, with its tokenizer) for zero-shot top-1: on the "
        "original and reconstructed images, and (DualToken, whose encoder is this SigLIP's vision tower) on the "
        "tokenizer's pooled quantised semantic features against the text tower (DualToken's Table 1 metric).",
    )
    zero_shot_dataset: str | None = config_field(
        None, "Image folder with one subfolder per class (the folder names are the class names), for zero-shot."
    )
    zero_shot_prompt: str = config_field("a photo of a {}.", "Prompt of each class name for the text tower.")
    zero_shot_prompt_file: str | None = config_field(
        None,
        "Text file of prompt templates, one per line with '{}' for the class name (e.g. the 80 ImageNet templates "
        "the DualToken reference averages); each class's embedding is their normalised mean. Replaces "
        "zero_shot_prompt.",
    )
    inception_weights: str | None = config_field(
        None, "torch-fidelity Inception weights file; enables rFID ([eval] extra)."
    )
    device: str = config_field("auto", "auto | cpu | cuda.")

    def __post_init__(self) -> None:
        if not self.model_path or not self.dataset or not self.output_json:
            raise ValueError("model_path, dataset and output_json are required")
        if bool(self.zero_shot_model) != bool(self.zero_shot_dataset):
            raise ValueError("zero-shot evaluation needs both zero_shot_model and zero_shot_dataset")


class _RfidImages:
    """Inputs and reconstructions as PNGs in `real/` and `fake/` of a temporary folder, for torch-fidelity."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="unimm-rfid-"))
        (self.root / "real").mkdir()
        (self.root / "fake").mkdir()

    def __call__(self, ids: list, inputs01: torch.Tensor, recon01: torch.Tensor) -> None:
        for sample_id, real, fake in zip(ids, inputs01, recon01):
            name = str(sample_id).replace("/", "_") + ".png"
            image_from_tensor(real).save(self.root / "real" / name)
            image_from_tensor(fake).save(self.root / "fake" / name)


def _counted(batches: Any, tracker: BadSampleTracker) -> Iterator[dict]:
    for batch in batches:
        for sample_id, reason in batch["skipped"]:
            tracker.record_bad(sample_id, reason)
        tracker.record_ok(len(batch["ids"]))
        yield batch


def load_eval_dataset(model: VisualTokenizer, args: ImageSourceArguments) -> ImageDataset:
    return ImageDataset(load_records(args.dataset, args, seed=0), ImageTransform.for_tokenizer(model))


def evaluate(args: TokenizerEvalArguments) -> dict[str, Any]:
    """Evaluate `args.model_path` on `args.dataset`; writes `args.output_json` (and the grid) and returns it."""
    from unimm.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    with model_folder("model_path", args.model_path, "a UniMM visual tokenizer"):
        model = load_tokenizer(args.model_path)
    model = model.to(device).eval()
    dataset = load_eval_dataset(model, args)
    tracker = BadSampleTracker(args.max_bad_fraction, min_seen=0, name="eval images")
    rfid = _RfidImages() if args.inception_weights else None
    batches = _counted(eval_batches(dataset, args.batch_size, args.max_images), tracker)
    results = evaluate_tokenizer(model, batches, device, image_writer=rfid, progress=True)
    tracker.check(final=True)
    if rfid is not None:
        results["rfid"] = compute_rfid(rfid.root / "real", rfid.root / "fake", args.inception_weights)
    results["semantic"] = semantic_metrics(model, dataset, args, device)
    if args.zero_shot_model:
        results["zero_shot"] = zero_shot_metrics(model, args, device)
    results.update(model_path=args.model_path, dataset=args.dataset, config_hash=model.config_hash(),
                   bad_samples=tracker.summary())
    output = Path(args.output_json)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    grid_path = write_grid(model, dataset, args, device)
    if grid_path is not None:
        results["grid_path"] = str(grid_path)
        output.write_text(json.dumps(results, indent=2))
    return results


def write_grid(model: VisualTokenizer, dataset: ImageDataset, args: TokenizerEvalArguments,
               device: torch.device) -> Path | None:
    """The input | reconstruction grid of the first `num_grid_images` images (None when there are none)."""
    grid = collate_images([dataset[i] for i in range(min(len(dataset), args.num_grid_images))])
    if not grid["pixel_values"].shape[0]:
        return None
    with torch.no_grad():
        recon = model(grid["pixel_values"].to(device)).reconstruction.float().cpu()
    grid_path = Path(args.grid_path) if args.grid_path else Path(args.output_json).with_suffix(".png")
    comparison_grid(
        denormalize(grid["pixel_values"], model.image_mean, model.image_std),
        denormalize(recon, model.image_mean, model.image_std),
    ).save(grid_path)
    return grid_path


def semantic_metrics(model: VisualTokenizer, dataset: ImageDataset, args: TokenizerEvalArguments,
                     device: torch.device) -> dict[str, Any]:
    """Semantic preservation against the initial encoder, or {"skipped": why} when that encoder is unknown."""
    from unimm.tokenizer.encoders import load_encoder
    from unimm.tokenizer.semantic_eval import evaluate_semantic_preservation, resolve_reference_encoder

    given = None
    if args.reference_encoder:
        with model_folder("reference_encoder", args.reference_encoder, "a Hugging Face vision encoder"):
            given = load_encoder(args.reference_encoder)
    try:
        reference = resolve_reference_encoder(model, given)
    except ValueError as error:
        return {"skipped": str(error)}
    batches = eval_batches(dataset, args.batch_size, args.max_images)
    return evaluate_semantic_preservation(model, batches, reference, device)


def _zero_shot_prompts(args: TokenizerEvalArguments) -> str | list[str]:
    if not args.zero_shot_prompt_file:
        return args.zero_shot_prompt
    path = Path(args.zero_shot_prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"zero_shot_prompt_file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [p for p in prompts if "{}" not in p]
    if not prompts or bad:
        raise ValueError(f"zero_shot_prompt_file {path}: every line must be a template with '{{}}' for the class "
                         f"name; {'it is empty' if not prompts else f'not: {bad[0]!r}'}")
    return prompts


def zero_shot_metrics(model: VisualTokenizer, args: TokenizerEvalArguments, device: torch.device) -> dict[str, Any]:
    """Zero-shot top-1 of `zero_shot_model` on the labelled folder's images and on their reconstructions."""
    from transformers import AutoModel, AutoTokenizer

    from unimm.tokenizer.encoders import image_processor_settings
    from unimm.tokenizer.semantic_eval import (
        ZeroShotClassifier,
        evaluate_quantized_feature_zero_shot,
        evaluate_zero_shot,
        quantized_feature_zero_shot_unavailable,
    )

    with model_folder("zero_shot_model", args.zero_shot_model, "a SigLIP/CLIP model with its tokenizer"):
        contrastive = AutoModel.from_pretrained(args.zero_shot_model).to(device)
        text_tokenizer = AutoTokenizer.from_pretrained(args.zero_shot_model)
    vision_config = contrastive.config.vision_config.to_dict()
    settings = image_processor_settings(vision_config, path=args.zero_shot_model,
                                        image_size=vision_config.get("image_size"))
    data_args = ImageSourceArguments(dataset=args.zero_shot_dataset, image_key=args.image_key)
    records = load_records(args.zero_shot_dataset, data_args, seed=0)
    ids = [str(record["id"]) for record in records]
    if not ids or any("/" not in record_id for record_id in ids):
        raise ValueError(f"zero_shot_dataset {args.zero_shot_dataset}: every image must sit in a class subfolder")
    class_names = sorted({record_id.split("/", 1)[0] for record_id in ids})
    dataset = ImageDataset(records, ImageTransform.for_tokenizer(model))
    classifier = ZeroShotClassifier(contrastive, text_tokenizer, class_names, settings.image_mean, settings.image_std,
                                    prompt=_zero_shot_prompts(args))
    label = {name: index for index, name in enumerate(class_names)}

    def labelled() -> Iterator[dict]:
        for batch in eval_batches(dataset, args.batch_size, args.max_images):
            yield {**batch, "labels": [label[str(i).split("/", 1)[0]] for i in batch["ids"]]}

    results = {**evaluate_zero_shot(model, labelled(), classifier, device), "class_names": class_names}
    reason = quantized_feature_zero_shot_unavailable(model)
    if reason is None:
        results.update(evaluate_quantized_feature_zero_shot(model, labelled(), classifier, device))
    else:
        results["quantized_semantic_features_skipped"] = reason
    return results
