"""The visual-tokenizer training loop behind `scripts/train_tokenizer.py` (DESIGN §5).

VQRAE stage 1 (encoder frozen) and stage 2 (encoder at its own lower learning rate, self-distillation, GAN
from a step), DualToken, l-DeTok options (passed to the model config) and the decoder-only clean finetune.
One `accelerate.Accelerator` handles devices, DDP under `accelerate launch` and bf16 autocast; the generator
and the PatchGAN discriminator have their own AdamW optimisers and warm-up + cosine schedules.

Exact resume: checkpoints hold every state dict, each rank's RNG state and the data position (batches
consumed); batches come from a per-epoch permutation seeded by `(seed, epoch)`, so a resumed run sees the
same batches in the same order as an uninterrupted one. Only complete checkpoints count (`unimm.train.checkpoint`),
and `train_log.jsonl` / `metrics.jsonl` are cut back to the resumed step, so no step is logged twice.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageDataset, ImageTransform, collate_images, read_image_records
from unimm.tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig, check_lpips_weights
from unimm.tokenizer.metrics import denormalize, evaluate_tokenizer, psnr
from unimm.tokenizer.param_groups import split_weight_decay
from unimm.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, trim_jsonl_log
from unimm.train.ema import EMA
from unimm.train.schedule import warmup_cosine_schedule
from unimm.utils.config import save_resolved_config
from unimm.utils.distributed import get_rank, get_world_size
from unimm.utils.errors import json_source_errors, model_folder, require_path

logger = logging.getLogger(__name__)

DATASET_SHORTCUTS = ("sample_photos", "shapes")


@dataclass
class TokenizerModelArguments:
    preset: str | None = field(
        default=None,
        metadata={"help": "build_tokenizer preset (vqrae-tiny, dualtoken-tiny, vqrae-siglip2-so400m-256, ...)."},
    )
    model_path: str | None = field(
        default=None,
        metadata={"help": "Start from a saved tokenizer (load_tokenizer), e.g. stage 1 output for stage 2."},
    )
    encoder_path: str | None = field(default=None, metadata={"help": "Local path of the pretrained vision encoder."})
    model_overrides: Union[dict, str, None] = field(
        default=None, metadata={"help": "Model config overrides (YAML mapping or JSON string), e.g. denoising options."}
    )
    stage: int = field(
        default=1, metadata={"help": "VQRAE stage: 1 = encoder frozen, 2 = encoder trained + distillation."}
    )
    decoder_only: bool = field(
        default=False, metadata={"help": "Train only the decoder (clean l-DeTok finetune; set denoising off)."}
    )


@dataclass
class TokenizerDataArguments:
    dataset: str | None = field(
        default=None,
        metadata={"help": "Image folder, jsonl/json/parquet, save_to_disk dir, tar shards, or sample_photos/shapes."},
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation images (default: the training set)."})
    image_key: str = field(default="image", metadata={"help": "Column/key holding the image (path, bytes or image)."})
    split: str = field(default="train", metadata={"help": "Split to read from multi-split sources."})
    image_size: int | None = field(
        default=None, metadata={"help": "Size of the shortcut datasets' images before the model's transform."}
    )
    num_samples: int = field(default=256, metadata={"help": "Number of images of the `shapes` shortcut."})
    allow_outside_image_folder: bool = field(
        default=False,
        metadata={"help": "Let record image paths leave their folder (absolute, `..`, symlinks); off: skipped."},
    )
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "Stop with an error once more than this fraction of images is unreadable."}
    )
    bad_sample_min_seen: int = field(
        default=100, metadata={"help": "Images seen before max_bad_fraction is enforced (always checked at the end)."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    eval_max_images: int | None = field(default=256, metadata={"help": "Cap on evaluation images (None = all)."})


@dataclass
class TokenizerTrainingArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "Run directory (config, checkpoints, samples, model)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (model init, data order, denoising noise)."})
    max_steps: int = field(default=1000, metadata={"help": "Total optimisation steps."})
    batch_size: int = field(default=8, metadata={"help": "Images per device per step."})
    eval_batch_size: int = field(default=16, metadata={"help": "Images per device per evaluation batch."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak LR of decoder, quantizer and projections."})
    encoder_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Peak LR of the encoder when it is trained (VQRAE stage 2, DualToken); 0 freezes it."},
    )
    disc_learning_rate: float = field(default=1e-4, metadata={"help": "Peak LR of the discriminator."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine schedule floor as a fraction of the peak LR."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA when supported) | no | bf16 | fp16."}
    )
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0 disables EMA)."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses and batch metrics every N steps."})
    sample_steps: int = field(
        default=500, metadata={"help": "Write an input|reconstruction PNG grid every N steps (0 = off)."}
    )
    num_sample_images: int = field(default=8, metadata={"help": "Images in each sample grid."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0 = only at start and end)."})
    save_steps: int = field(default=1000, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume: str | None = field(
        default=None, metadata={"help": "'auto' (latest checkpoint in output_dir) or a checkpoint dir."}
    )
    stop_after_step: int = field(
        default=0,
        metadata={"help": "End this run after this step (checkpointed) though the schedule runs to max_steps."},
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})


def _parse_overrides(value: dict | str | None) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"model_overrides must be a mapping or a JSON object string, got {value!r}: {err}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"model_overrides must be a JSON object, got {value!r}")
    return parsed


def build_model(args: TokenizerModelArguments) -> nn.Module:
    """Build (preset) or load (model_path) the tokenizer and put it in the requested training stage."""
    from unimm.tokenizer import build_tokenizer, load_tokenizer

    overrides = _parse_overrides(args.model_overrides)
    if args.model_path:
        with model_folder("model_path", args.model_path, "a UniMM visual tokenizer"):
            model = load_tokenizer(args.model_path, **overrides)
    elif args.preset:
        if args.encoder_path:
            overrides["encoder_path"] = args.encoder_path
        model = build_tokenizer(args.preset, **overrides)
    else:
        raise ValueError("set either preset (e.g. vqrae-tiny) or model_path (a saved tokenizer)")
    if args.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {args.stage}")
    if hasattr(model, "set_stage"):
        model.set_stage(args.stage)
    elif args.stage != 1:
        raise ValueError(f"stage={args.stage} applies to VQRAE only; {type(model).__name__} has no training stages")
    if getattr(model.config, "train_encoder", False) and hasattr(model, "set_train_encoder"):
        # DualToken: take the frozen semantic teacher from the initial encoder now, before any update.
        model.set_train_encoder(True)
    if args.decoder_only:
        model.set_decoder_only(True)
    return model


# --------------------------------------------------------------------------------------------------- data


def load_records(source: str, data_args: TokenizerDataArguments, seed: int) -> Any:
    """Image records (`id`, `image`) from a path or one of the shortcuts `sample_photos` / `shapes`."""
    if source == "sample_photos":
        from unimm.data.toy.sample_photos import load_sample_photos

        return [{"id": name, "image": image} for name, image in load_sample_photos(data_args.image_size)]
    if source == "shapes":
        from unimm.data.toy.shapes import ShapesConfig, ShapesDataset

        config = ShapesConfig(image_size=data_args.image_size) if data_args.image_size else None
        shapes = ShapesDataset(data_args.num_samples, seed=seed, config=config)
        return [{"id": sample.id, "image": sample.image} for sample in shapes]
    require_path("dataset", source)
    with json_source_errors(source):
        return read_image_records(source, image_key=data_args.image_key, split=data_args.split,
                                  allow_outside_folder=data_args.allow_outside_image_folder)


class EpochBatches:
    """Per-rank batches of dataset indices: epoch `e` is a permutation seeded by `(seed, e)`, cut into global
    batches of `batch_size * world_size` (remainder dropped), each rank taking its slice.

    Batch `i` overall is `batches(i // per_epoch)[i % per_epoch]`, so a data position is one integer.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_items // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_items} images, fewer than one global batch "
                f"({batch_size} per device x {world_size} devices); lower batch_size"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        batches = []
        for b in range(self.per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            batches.append(order[start : start + self.batch_size])
        return batches

    def iterate(self, dataset: ImageDataset, start: int, num_workers: int) -> Iterator[dict]:
        """Collated batches from overall batch index `start` onwards (forever)."""
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            loader = DataLoader(
                dataset,
                batch_sampler=self.epoch(epoch)[offset:],
                collate_fn=collate_images,
                num_workers=num_workers,
                generator=torch.Generator(),  # keep the global RNG untouched (exact resume)
            )
            yield from loader
            epoch, offset = epoch + 1, 0


def eval_batches(dataset: ImageDataset, batch_size: int, max_images: int | None, num_workers: int = 0) -> DataLoader:
    """Sequential evaluation batches over (the first `max_images` of) `dataset`, sharded across ranks."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(count))[get_rank() :: get_world_size()]
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_images, num_workers=num_workers, generator=torch.Generator()
    )


def image_from_tensor(image01: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` image in [0, 1] -> PIL RGB."""
    return Image.fromarray((image01.float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


def comparison_grid(inputs01: torch.Tensor, reconstructions01: torch.Tensor, columns: int = 4) -> Image.Image:
    """A PNG-ready grid of (input | reconstruction) pairs from images in [0, 1] (`[B, 3, H, W]`)."""
    pairs = torch.cat([inputs01, reconstructions01], dim=-1)  # [B, 3, H, 2W]
    batch, _, height, width = pairs.shape
    columns = max(1, min(columns, batch))
    rows = math.ceil(batch / columns)
    pad = 2
    canvas = torch.ones(3, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for i in range(batch):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[:, top : top + height, left : left + width] = pairs[i].float().clamp(0, 1)
    return image_from_tensor(canvas)


# ---------------------------------------------------------------------------------------------- training


def _trainable_groups(model: nn.Module, args: TokenizerTrainingArguments) -> list[dict[str, Any]]:
    """AdamW groups: encoder at its own LR, the rest at the main LR; weight decay on matrices only."""
    named = model.parameter_groups()
    if args.encoder_learning_rate <= 0:
        for param in named["encoder"]:
            param.requires_grad_(False)
    groups = []
    for name, lr in (("encoder", args.encoder_learning_rate), ("other", args.learning_rate)):
        params = [p for p in named[name] if p.requires_grad]
        decay, no_decay = split_weight_decay(model, params)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": args.weight_decay, "name": f"{name}/decay"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}/no_decay"})
    if not groups:
        raise ValueError("no trainable parameters: check stage / decoder_only / encoder_learning_rate")
    return groups


def _resolve_mixed_precision(choice: str) -> str:
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if choice not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {choice!r}")
    return choice


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _scalar_logs(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.detach().float())
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def train_tokenizer(
    model_args: TokenizerModelArguments,
    data_args: TokenizerDataArguments,
    loss_args: ReconstructionLossConfig,
    train_args: TokenizerTrainingArguments,
) -> dict[str, Any]:
    """Run (or resume) one tokenizer training job; returns a summary (also written to `results.json`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if not train_args.output_dir:
        raise ValueError("output_dir is required")
    if not data_args.dataset:
        raise ValueError("dataset is required (a path, or sample_photos / shapes)")
    started = time.perf_counter()
    output_dir = Path(train_args.output_dir)
    # cpu=True without CUDA makes torchrun/`accelerate launch` CPU jobs real multi-process (gloo) runs.
    accelerator = Accelerator(
        mixed_precision=_resolve_mixed_precision(train_args.mixed_precision), cpu=not torch.cuda.is_available()
    )
    device = accelerator.device
    set_seed(train_args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(output_dir, model_args, data_args, loss_args, train_args)

    check_lpips_weights(loss_args)  # a recipe that needs LPIPS weights fails before any model or data work
    model = build_model(model_args).to(device)  # before the EMA copy, so its shadow lives on the same device
    loss_module = ReconstructionLoss(loss_args, model.image_mean, model.image_std).to(device)
    param_groups = _trainable_groups(model, train_args)
    optimizer = torch.optim.AdamW(param_groups, betas=(train_args.adam_beta1, train_args.adam_beta2))
    scheduler = warmup_cosine_schedule(
        optimizer, train_args.warmup_steps, train_args.max_steps, train_args.min_lr_ratio
    )
    trainable = [p for group in param_groups for p in group["params"]]
    ema = EMA(model, train_args.ema_decay) if train_args.ema_decay > 0 else None

    discriminator = loss_module.discriminator
    disc_optimizer = disc_scheduler = None
    if discriminator is not None:
        disc_optimizer = torch.optim.AdamW(
            discriminator.parameters(),
            lr=train_args.disc_learning_rate,
            betas=(train_args.adam_beta1, train_args.adam_beta2),
            weight_decay=0.0,
        )
        disc_scheduler = warmup_cosine_schedule(
            disc_optimizer,
            train_args.warmup_steps,
            train_args.max_steps,
            train_args.min_lr_ratio,
            start_step=loss_args.gan_start_step,
        )

    # Data.
    transform = ImageTransform.for_tokenizer(model)
    train_set = ImageDataset(load_records(data_args.dataset, data_args, train_args.seed), transform)
    eval_source = data_args.eval_dataset or data_args.dataset
    eval_set = (
        train_set
        if eval_source == data_args.dataset
        else ImageDataset(load_records(eval_source, data_args, train_args.seed), transform)
    )
    sampler = EpochBatches(len(train_set), train_args.batch_size, train_args.seed, get_rank(), get_world_size())
    tracker = BadSampleTracker(data_args.max_bad_fraction, min_seen=data_args.bad_sample_min_seen, name="train images")

    # Resume (before wrapping, so state dicts carry plain parameter names).
    state_objects: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if discriminator is not None:
        state_objects.update(discriminator=discriminator, disc_optimizer=disc_optimizer, disc_scheduler=disc_scheduler)
    if ema is not None:
        state_objects["ema"] = ema
    step, batches_consumed = 0, 0
    resume_path = resolve_resume(train_args.resume, output_dir)
    if resume_path is not None:
        trainer_state = load_checkpoint(resume_path, state_objects)
        step, batches_consumed = int(trainer_state["step"]), int(trainer_state["batches_consumed"])
        tracker.num_ok, tracker.num_bad = (
            trainer_state["bad_samples"]["num_ok"],
            trainer_state["bad_samples"]["num_bad"],
        )
        tracker.bad_examples = [tuple(x) for x in trainer_state["bad_samples"]["bad_examples"]]

    if discriminator is not None:
        model, optimizer, wrapped_disc, disc_optimizer = accelerator.prepare(
            model, optimizer, discriminator, disc_optimizer
        )
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        wrapped_disc = None
    unwrapped = accelerator.unwrap_model(model)
    metrics_log = output_dir / "metrics.jsonl"
    train_log = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        # A resumed run replays the steps after its checkpoint: drop what the killed run logged for them (a fresh
        # run in a reused output_dir starts its logs over), so every step appears once.
        for log_file in (train_log, metrics_log):
            trim_jsonl_log(log_file, step if resume_path is not None else -1)

    def run_eval(at_step: int) -> dict[str, Any]:
        loader = eval_batches(eval_set, train_args.eval_batch_size, data_args.eval_max_images, data_args.num_workers)
        with accelerator.autocast():
            results = evaluate_tokenizer(unwrapped, loader, device)
        record = {"step": at_step, **{k: v for k, v in results.items() if k != "codebooks"}}
        if accelerator.is_main_process:
            _append_jsonl(metrics_log, record)
        logger.info("eval step %d: %s", at_step, _format(record))
        return results

    sample_batch = None
    if train_args.sample_steps > 0 and accelerator.is_main_process:
        sample_batch = collate_images([eval_set[i] for i in range(min(len(eval_set), train_args.num_sample_images))])

    def write_samples(at_step: int) -> None:
        if sample_batch is None or sample_batch["pixel_values"].shape[0] == 0:
            return
        was_training = unwrapped.training
        unwrapped.eval()
        with torch.no_grad(), accelerator.autocast():
            recon = unwrapped(sample_batch["pixel_values"].to(device)).reconstruction
        unwrapped.train(was_training)
        inputs01 = denormalize(sample_batch["pixel_values"], unwrapped.image_mean, unwrapped.image_std)
        recon01 = denormalize(recon.float().cpu(), unwrapped.image_mean, unwrapped.image_std)
        path = output_dir / "samples" / f"step_{at_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        comparison_grid(inputs01, recon01).save(path)
        logger.info("step %d: sample grid %s (PSNR %.2f dB)", at_step, path, float(psnr(recon01, inputs01).mean()))

    initial_eval = run_eval(0) if step == 0 else None
    if step == 0:
        write_samples(0)

    batches = sampler.iterate(train_set, batches_consumed, data_args.num_workers)
    progress = tqdm(
        total=train_args.max_steps,
        initial=step,
        desc="train tokenizer",
        disable=not (train_args.progress_bar and accelerator.is_main_process),
    )
    model.train()
    stop_at = min(train_args.max_steps, train_args.stop_after_step or train_args.max_steps)
    loop_started, first_step = time.perf_counter(), step
    while step < stop_at:
        batch = next(batches)
        batches_consumed += 1
        for sample_id, reason in batch["skipped"]:
            tracker.record_bad(sample_id, reason)
        tracker.record_ok(len(batch["ids"]))
        if batch["pixel_values"].shape[0] == 0:
            continue
        pixel_values = batch["pixel_values"].to(device)

        with accelerator.autocast():
            output = model(pixel_values)
            rec_loss, logs = loss_module.generator_loss(
                pixel_values, output.reconstruction, step, last_layer=unwrapped.decoder_last_layer()
            )
            model_losses = {name: value for name, value in output.losses.items()}
            loss = rec_loss + sum(model_losses.values())
        accelerator.backward(loss)
        grad_norm = None
        if train_args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, train_args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if loss_module.gan_active(step):
            with accelerator.autocast():
                disc_loss, disc_logs = loss_module.discriminator_loss(
                    pixel_values, output.reconstruction.detach(), discriminator=wrapped_disc
                )
            accelerator.backward(disc_loss)
            if train_args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(wrapped_disc.parameters(), train_args.max_grad_norm)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
            logs.update(disc_logs)
        if disc_scheduler is not None:
            with warnings.catch_warnings():
                # Before gan_start_step the discriminator does not step; its schedule still counts steps.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                disc_scheduler.step()
        if ema is not None:
            ema.update(unwrapped)
        step += 1
        progress.update(1)

        if train_args.logging_steps > 0 and (step % train_args.logging_steps == 0 or step == stop_at):
            record = {"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[-1]}
            record.update(_scalar_logs(logs))
            record.update(_scalar_logs({f"loss/{k}": v for k, v in model_losses.items()}))
            record.update(_scalar_logs(output.stats))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            with torch.no_grad():
                mean, std = unwrapped.image_mean, unwrapped.image_std
                record["batch_psnr"] = float(
                    psnr(
                        denormalize(output.reconstruction.detach(), mean, std), denormalize(pixel_values, mean, std)
                    ).mean()
                )
            record["bad_samples"] = tracker.num_bad
            if accelerator.is_main_process:
                _append_jsonl(train_log, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['batch_psnr']:.2f}")
            logger.info("step %d: %s", step, _format(record))
        if train_args.sample_steps > 0 and step % train_args.sample_steps == 0 and accelerator.is_main_process:
            write_samples(step)
        if train_args.eval_steps > 0 and step % train_args.eval_steps == 0 and step < train_args.max_steps:
            run_eval(step)
        if (train_args.save_steps > 0 and step % train_args.save_steps == 0) or step == stop_at:
            trainer_state = {"batches_consumed": batches_consumed, "bad_samples": tracker.summary()}
            save_checkpoint(output_dir, step, state_objects, trainer_state, keep_last=train_args.save_total_limit)
    progress.close()
    loop_time = time.perf_counter() - loop_started

    summary: dict[str, Any] = {
        "step": step,
        "bad_samples": tracker.summary(),
        "output_dir": str(output_dir),
        # Loop time includes the periodic sample grids, evaluations and checkpoints.
        "train_loop_s": loop_time,
        "seconds_per_step": loop_time / max(1, step - first_step),
    }
    if initial_eval is not None:
        summary["initial_eval"] = initial_eval
    if step < train_args.max_steps:
        summary["status"] = "stopped"
        logger.info("stopped at step %d of %d (stop_after_step); resume with --resume auto", step, train_args.max_steps)
        return summary

    tracker.check(final=True)
    summary["status"] = "finished"
    summary["final_eval"] = run_eval(step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir / "model")
        summary["model_path"] = str(output_dir / "model")
    if ema is not None:
        ema_model = copy.deepcopy(unwrapped)
        ema.copy_to(ema_model)
        summary["ema_eval"] = evaluate_tokenizer(
            ema_model, eval_batches(eval_set, train_args.eval_batch_size, data_args.eval_max_images), device
        )
        if accelerator.is_main_process:
            ema_model.save_pretrained(output_dir / "model_ema")
            summary["ema_model_path"] = str(output_dir / "model_ema")
    summary["wall_time_s"] = time.perf_counter() - started
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    logger.info("finished: %s", _format({k: v for k, v in summary["final_eval"].items() if k != "codebooks"}))
    return summary


def _format(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
