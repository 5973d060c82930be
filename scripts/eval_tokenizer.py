#!/usr/bin/env python
"""Evaluate a trained visual tokenizer: PSNR, SSIM, codebook utilisation and perplexity (and rFID when
torch-fidelity and local Inception weights are available) over a dataset, written as JSON, plus a PNG grid of
input | reconstruction pairs. "semantic" holds the semantic preservation against the initial encoder
(unimm.tokenizer.semantic_eval): known for a DualToken whose encoder was never trained, otherwise given by
--reference_encoder (the pretrained encoder the tokenizer started from); without one it says why it was skipped.

    python scripts/eval_tokenizer.py --model_path runs/vqrae-tiny/model --dataset sample_photos --image_size 32 \
        --output_json runs/vqrae-tiny/eval.json
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unimm.cli import parse_config, run_main
from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.tokenizer.metrics import compute_rfid, denormalize, evaluate_tokenizer
from unimm.train.tokenizer_trainer import (
    TokenizerDataArguments,
    comparison_grid,
    eval_batches,
    image_from_tensor,
    load_records,
)
from unimm.utils.errors import model_folder
from unimm.utils.logging import setup_logging

if TYPE_CHECKING:
    from unimm.tokenizer.base import VisualTokenizer


@dataclass
class EvalArguments:
    model_path: str | None = field(default=None, metadata={"help": "Saved tokenizer directory (save_pretrained)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Images: folder, jsonl/json/parquet, ... or sample_photos/shapes."}
    )
    image_key: str = field(default="image", metadata={"help": "Column/key holding the image."})
    split: str = field(default="train", metadata={"help": "Split to read from multi-split sources."})
    image_size: int | None = field(default=None, metadata={"help": "Size of the shortcut datasets' images."})
    num_samples: int = field(default=64, metadata={"help": "Number of images of the `shapes` shortcut."})
    max_images: int | None = field(default=None, metadata={"help": "Evaluate at most this many images."})
    batch_size: int = field(default=16, metadata={"help": "Images per batch."})
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "Fail when more than this fraction of images is unreadable."}
    )
    output_json: str | None = field(default=None, metadata={"help": "Where to write the metrics (JSON)."})
    grid_path: str | None = field(
        default=None, metadata={"help": "PNG grid of input|reconstruction (default: next to the JSON)."}
    )
    num_grid_images: int = field(default=16, metadata={"help": "Images in the comparison grid."})
    reference_encoder: str | None = field(
        default=None,
        metadata={"help": "Local HF checkpoint of the initial (pretrained) encoder, for the semantic metrics."},
    )
    inception_weights: str | None = field(
        default=None, metadata={"help": "torch-fidelity Inception weights file; enables rFID ([eval] extra)."}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda."})


def evaluate(args: EvalArguments) -> dict[str, Any]:
    from unimm.tokenizer import load_tokenizer

    if not args.model_path or not args.dataset or not args.output_json:
        raise ValueError("model_path, dataset and output_json are required")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    with model_folder("model_path", args.model_path, "a UniMM visual tokenizer"):
        model = load_tokenizer(args.model_path)
    model = model.to(device).eval()
    data_args = TokenizerDataArguments(
        dataset=args.dataset,
        image_key=args.image_key,
        split=args.split,
        image_size=args.image_size,
        num_samples=args.num_samples,
    )
    transform = ImageTransform.for_tokenizer(model)
    dataset = ImageDataset(load_records(args.dataset, data_args, seed=0), transform)
    tracker = BadSampleTracker(args.max_bad_fraction, min_seen=0, name="eval images")

    def batches():
        for batch in eval_batches(dataset, args.batch_size, args.max_images):
            for sample_id, reason in batch["skipped"]:
                tracker.record_bad(sample_id, reason)
            tracker.record_ok(len(batch["ids"]))
            yield batch

    rfid_dirs = None
    if args.inception_weights:
        rfid_dirs = Path(tempfile.mkdtemp(prefix="unimm-rfid-"))
        (rfid_dirs / "real").mkdir()
        (rfid_dirs / "fake").mkdir()

    def write_pngs(ids, inputs01, recon01):
        for sample_id, real, fake in zip(ids, inputs01, recon01):
            name = str(sample_id).replace("/", "_") + ".png"
            image_from_tensor(real).save(rfid_dirs / "real" / name)
            image_from_tensor(fake).save(rfid_dirs / "fake" / name)

    results = evaluate_tokenizer(
        model, batches(), device, image_writer=write_pngs if rfid_dirs else None, progress=True
    )
    tracker.check(final=True)
    if rfid_dirs is not None:
        results["rfid"] = compute_rfid(rfid_dirs / "real", rfid_dirs / "fake", args.inception_weights)
    results["semantic"] = _semantic_metrics(model, dataset, args, device)
    results["model_path"] = args.model_path
    results["dataset"] = args.dataset
    results["config_hash"] = model.config_hash()
    results["bad_samples"] = tracker.summary()

    output = Path(args.output_json)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    grid = collate_images([dataset[i] for i in range(min(len(dataset), args.num_grid_images))])
    if grid["pixel_values"].shape[0]:
        with torch.no_grad():
            recon = model(grid["pixel_values"].to(device)).reconstruction.float().cpu()
        grid_path = Path(args.grid_path) if args.grid_path else output.with_suffix(".png")
        comparison_grid(
            denormalize(grid["pixel_values"], model.image_mean, model.image_std),
            denormalize(recon, model.image_mean, model.image_std),
        ).save(grid_path)
        results["grid_path"] = str(grid_path)
        output.write_text(json.dumps(results, indent=2))
    return results


def _semantic_metrics(model: VisualTokenizer, dataset: ImageDataset, args: EvalArguments, device: torch.device) -> dict[str, Any]:
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
    return evaluate_semantic_preservation(model, eval_batches(dataset, args.batch_size, args.max_images), reference, device)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    setup_logging()
    (args,) = parse_config((EvalArguments,), argv)
    return evaluate(args)


if __name__ == "__main__":
    run_main(main)
