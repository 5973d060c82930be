"""The visual-tokenizer training loop (docs/DESIGN.md §5): `setup` builds a `TokenizerRun`, `fit` trains it,
`validate` evaluates it, `finish` writes the final model and summary; `train_tokenizer` runs all four.

VQRAE stage 1 (encoder frozen) and stage 2 (encoder at its own lower learning rate, self-distillation, GAN
from a step), DualToken, l-DeTok options (passed to the model config) and the decoder-only clean finetune.
One `accelerate.Accelerator` (from `unimm.utils.runtime`) handles devices, DDP under `accelerate launch` and bf16
autocast; the generator and the PatchGAN discriminator have their own AdamW optimisers and warm-up + cosine
schedules.

Exact resume: checkpoints (`unimm.train.tokenizer.state`) hold every state, each rank's RNG state and the data
position (batches consumed); batches come from a per-epoch permutation seeded by `(seed, epoch)`, so a resumed run
sees the same batches in the same order as an uninterrupted one. Only complete checkpoints count, and
`train_log.jsonl` / `metrics.jsonl` are cut back to the resumed step, so no step is logged twice.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig, check_lpips_weights
from unimm.tokenizer.metrics import denormalize, evaluate_tokenizer, psnr
from unimm.train.checkpoint import trim_jsonl_log
from unimm.train.guards import (
    DivergenceError,
    RunLock,
    StopOnSignal,
    check_resume_fingerprint,
    holds_on_every_rank,
    rank0_decides,
    run_fingerprint,
)
from unimm.train.tokenizer import state
from unimm.train.tokenizer.args import TokenizerDataArguments, TokenizerModelArguments, TokenizerTrainingArguments
from unimm.train.tokenizer.build import Optimisation, build_optimisation, build_tokenizer_model
from unimm.train.tokenizer.data import EpochBatches, comparison_grid, eval_batches, load_records
from unimm.utils.config import config_to_dict, save_resolved_config
from unimm.utils.distributed import get_rank, get_world_size

logger = logging.getLogger(__name__)


@dataclass
class TokenizerRun:
    """One training job between `setup` and `finish`: its configs, prepared objects, data and position."""

    args: TokenizerTrainingArguments
    data_args: TokenizerDataArguments
    accelerator: Any
    output_dir: Path
    model: nn.Module  # as `accelerator.prepare` returned it (DDP-wrapped under several processes)
    unwrapped: nn.Module
    loss_module: ReconstructionLoss
    opt: Optimisation  # optimisers and schedules as prepared
    discriminator: nn.Module | None  # prepared, None without a GAN
    train_set: ImageDataset
    eval_set: ImageDataset
    sampler: EpochBatches
    tracker: BadSampleTracker
    semantic_reference: nn.Module | None = None
    sample_batch: dict | None = None
    lock: RunLock | None = None  # this run's hold on output_dir, released when it ends
    fingerprint: dict | None = None  # recorded in every checkpoint
    step: int = 0
    batches_consumed: int = 0
    resumed_from: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def metrics_log(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def train_log(self) -> Path:
        return self.output_dir / "train_log.jsonl"


def _datasets(model: nn.Module, data_args: TokenizerDataArguments, seed: int) -> tuple[ImageDataset, ImageDataset]:
    transform = ImageTransform.for_tokenizer(model)
    train_set = ImageDataset(load_records(data_args.dataset, data_args, seed), transform)
    eval_source = data_args.eval_dataset or data_args.dataset
    if eval_source == data_args.dataset:
        return train_set, train_set
    return train_set, ImageDataset(load_records(eval_source, data_args, seed), transform)


def _prepare(accelerator: Any, model: nn.Module, loss_module: ReconstructionLoss, opt: Optimisation) -> tuple:
    """`accelerator.prepare` the models, optimisers and schedules (so `save_state` holds them all); returns
    (model, discriminator or None), with `opt` updated in place."""
    if loss_module.discriminator is None:
        model, opt.optimizer, opt.scheduler = accelerator.prepare(model, opt.optimizer, opt.scheduler)
        return model, None
    model, opt.optimizer, opt.scheduler, disc, opt.disc_optimizer, opt.disc_scheduler = accelerator.prepare(
        model, opt.optimizer, opt.scheduler, loss_module.discriminator, opt.disc_optimizer, opt.disc_scheduler
    )
    return model, disc


def _semantic_reference(model: nn.Module, data_args: TokenizerDataArguments) -> nn.Module | None:
    """The initial encoder the periodic evaluation compares semantic features with: `reference_encoder` when given,
    else the tokenizer's frozen teacher when it trains its encoder; None (no semantic metrics) otherwise."""
    if data_args.reference_encoder:
        from unimm.tokenizer.encoders import load_encoder
        from unimm.utils.errors import model_folder

        # Building the encoder before its weights load draws random numbers: keep the training's RNG where it was.
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())), model_folder(
            "reference_encoder", data_args.reference_encoder, "a Hugging Face vision encoder"
        ):
            return load_encoder(data_args.reference_encoder)
    return getattr(model, "teacher", None)


def setup(
    model_args: TokenizerModelArguments,
    data_args: TokenizerDataArguments,
    loss_args: ReconstructionLossConfig,
    args: TokenizerTrainingArguments,
) -> TokenizerRun:
    """Build (or resume) a run: accelerator, seed, model, loss, optimisers, data, then the checkpoint if any."""
    from accelerate.utils import set_seed

    from unimm.utils.runtime import make_accelerator

    if not args.output_dir:
        raise ValueError("output_dir is required")
    if not data_args.dataset:
        raise ValueError("dataset is required (a path, or sample_photos / shapes)")
    output_dir = Path(args.output_dir)
    # The schedules step once per optimiser step, as before accelerate held them (its default: once per process).
    accelerator = make_accelerator(args.mixed_precision_choice, step_scheduler_with_optimizer=False)
    set_seed(args.seed)
    # One run per folder, resuming only its own checkpoints (the LLM programs' rules, `unimm.train.guards`).
    lock = RunLock(output_dir)
    rank0_decides(lambda: lock.acquire().path.name)
    fingerprint = run_fingerprint(config_to_dict(model_args, data_args, loss_args, args), get_world_size(), None)
    checkpoint = rank0_decides(lambda: _checked_resume(args, output_dir, fingerprint))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if accelerator.is_main_process:  # after the checks: a refused launch leaves the run's record alone
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(output_dir, model_args, data_args, loss_args, args)
    check_lpips_weights(loss_args)  # a recipe that needs LPIPS weights fails before any model or data work
    model = build_tokenizer_model(model_args).to(accelerator.device)  # before the EMA copy: same device
    if args.gradient_checkpointing:  # transformers >= 5.24 names it activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    loss_module = ReconstructionLoss(loss_args, model.image_mean, model.image_std).to(accelerator.device)
    opt = build_optimisation(model, loss_module, loss_args, args)
    train_set, eval_set = _datasets(model, data_args, args.seed)
    sampler = EpochBatches(len(train_set), args.per_device_train_batch_size, args.seed, get_rank(), get_world_size())
    tracker = BadSampleTracker(data_args.max_bad_fraction, min_seen=data_args.bad_sample_min_seen, name="train images")
    prepared, discriminator = _prepare(accelerator, model, loss_module, opt)
    run = TokenizerRun(args, data_args, accelerator, output_dir, prepared, accelerator.unwrap_model(prepared),
                       loss_module, opt, discriminator, train_set, eval_set, sampler, tracker)
    run.semantic_reference = _semantic_reference(run.unwrapped, data_args)
    run.lock, run.fingerprint = lock, fingerprint
    if checkpoint is not None:
        state.load(run, checkpoint)
    if accelerator.is_main_process:
        # A resumed run replays the steps after its checkpoint: drop what the killed run logged for them (a fresh
        # run in a reused output_dir starts its logs over), so every step appears once.
        for log_file in (run.train_log, run.metrics_log):
            trim_jsonl_log(log_file, run.step if checkpoint is not None else -1)
    if args.sample_steps > 0 and accelerator.is_main_process:
        run.sample_batch = collate_images([eval_set[i] for i in range(min(len(eval_set), args.num_sample_images))])
    return run


def validate(run: TokenizerRun, at_step: int, model: nn.Module | None = None, log: bool | None = None) -> dict[str, Any]:
    """Evaluate (`model`, default the run's) on the evaluation set: PSNR, SSIM, codebook use, and the semantic
    preservation against the initial encoder when one is known; appended to metrics.jsonl and logged when `log`
    (default: for the run's own model, not for another `model`)."""
    data_args, args = run.data_args, run.args
    model = run.unwrapped if model is None else model
    loader = eval_batches(run.eval_set, args.eval_batch_size, data_args.eval_max_images, data_args.num_workers)
    with run.accelerator.autocast():
        results = evaluate_tokenizer(model, loader, run.device)
        if run.semantic_reference is not None:
            from unimm.tokenizer.semantic_eval import evaluate_semantic_preservation

            loader = eval_batches(run.eval_set, args.eval_batch_size, data_args.eval_max_images, data_args.num_workers)
            results["semantic"] = evaluate_semantic_preservation(model, loader, run.semantic_reference, run.device)
    if (model is run.unwrapped) if log is None else log:
        record = {"step": at_step, **_flat({k: v for k, v in results.items() if k != "codebooks"})}
        if run.accelerator.is_main_process:
            _append_jsonl(run.metrics_log, record)
        logger.info("eval step %d: %s", at_step, _format(record))
    return results


def write_samples(run: TokenizerRun, at_step: int) -> None:
    """An input | reconstruction grid of the first evaluation images, as `samples/step_<step>.png` (rank 0)."""
    batch, model = run.sample_batch, run.unwrapped
    if batch is None or batch["pixel_values"].shape[0] == 0:
        return
    was_training = model.training
    model.eval()
    with torch.no_grad(), run.accelerator.autocast():
        recon = model(batch["pixel_values"].to(run.device)).reconstruction
    model.train(was_training)
    inputs01 = denormalize(batch["pixel_values"], model.image_mean, model.image_std)
    recon01 = denormalize(recon.float().cpu(), model.image_mean, model.image_std)
    path = run.output_dir / "samples" / f"step_{at_step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    comparison_grid(inputs01, recon01).save(path)
    logger.info("step %d: sample grid %s (PSNR %.2f dB)", at_step, path, float(psnr(recon01, inputs01).mean()))


@dataclass
class StepResult:
    loss: torch.Tensor
    logs: dict[str, Any]
    model_losses: dict[str, torch.Tensor]
    output: Any
    grad_norm: Any
    pixel_values: torch.Tensor


def train_step(run: TokenizerRun, pixel_values: torch.Tensor) -> StepResult:
    """One generator update, then (once the GAN is on) one discriminator update, the schedules and the EMA."""
    accelerator, loss_module, opt, max_norm = run.accelerator, run.loss_module, run.opt, run.args.max_grad_norm
    with accelerator.autocast():
        output = run.model(pixel_values)
        rec_loss, logs = loss_module.generator_loss(
            pixel_values, output.reconstruction, run.step, last_layer=run.unwrapped.decoder_last_layer()
        )
        model_losses = dict(output.losses)
        loss = rec_loss + sum(model_losses.values())
    if not holds_on_every_rank(bool(torch.isfinite(loss.detach()).all())):
        # before the update: the weights, the EMA and every checkpoint so far stay finite
        raise DivergenceError(f"training diverged at step {run.step + 1}: the loss is "
                              f"{float(loss.detach().float())} on rank {get_rank()} (or another rank); the last "
                              f"complete checkpoint is kept (lower the learning rate or resume from it)")
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(opt.trainable, max_norm) if max_norm > 0 else None
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    if loss_module.gan_active(run.step):
        with accelerator.autocast():
            disc_loss, disc_logs = loss_module.discriminator_loss(
                pixel_values, output.reconstruction.detach(), discriminator=run.discriminator, step=run.step
            )
        accelerator.backward(disc_loss)
        if max_norm > 0:
            accelerator.clip_grad_norm_(run.discriminator.parameters(), max_norm)
        opt.disc_optimizer.step()
        opt.disc_optimizer.zero_grad(set_to_none=True)
        logs.update(disc_logs)
    if opt.disc_scheduler is not None:
        with warnings.catch_warnings():
            # Before gan_start_step the discriminator does not step; its schedule still counts steps.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            opt.disc_scheduler.step()
    if opt.ema is not None:
        opt.ema.update(run.unwrapped)
    run.step += 1
    return StepResult(loss, logs, model_losses, output, grad_norm, pixel_values)


def log_step(run: TokenizerRun, result: StepResult, progress: Any) -> None:
    """Append the step's losses, learning rate, model stats, gradient norm and batch PSNR to train_log.jsonl."""
    record = {"step": run.step, "loss": float(result.loss.detach()), "lr": run.opt.scheduler.get_last_lr()[-1]}
    record.update(_scalar_logs(result.logs))
    record.update(_scalar_logs({f"loss/{k}": v for k, v in result.model_losses.items()}))
    record.update(_scalar_logs(result.output.stats))
    if result.grad_norm is not None:
        record["grad_norm"] = float(result.grad_norm)
    with torch.no_grad():
        mean, std = run.unwrapped.image_mean, run.unwrapped.image_std
        reconstruction01 = denormalize(result.output.reconstruction.detach(), mean, std)
        record["batch_psnr"] = float(psnr(reconstruction01, denormalize(result.pixel_values, mean, std)).mean())
    record["bad_samples"] = run.tracker.num_bad
    if run.accelerator.is_main_process:
        _append_jsonl(run.train_log, record)
    progress.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['batch_psnr']:.2f}")
    logger.info("step %d: %s", run.step, _format(record))


def _after_step(run: TokenizerRun, result: StepResult, stop_at: int, progress: Any) -> None:
    """The periodic work after a step: log, sample grid, evaluation, checkpoint."""
    args, step = run.args, run.step
    if args.logging_steps > 0 and (step % args.logging_steps == 0 or step == stop_at):
        log_step(run, result, progress)
    if args.sample_steps > 0 and step % args.sample_steps == 0 and run.accelerator.is_main_process:
        write_samples(run, step)
    if args.eval_steps > 0 and step % args.eval_steps == 0 and step < args.max_steps:
        validate(run, step)
    if (args.save_steps > 0 and step % args.save_steps == 0) or step == stop_at:
        state.save(run)


def fit(run: TokenizerRun) -> dict[str, Any]:
    """Train from the run's position to `max_steps` (or `stop_after_step`); returns the loop's summary."""
    from tqdm.auto import tqdm

    args = run.args
    initial_eval = validate(run, 0) if run.step == 0 else None
    if run.step == 0:
        write_samples(run, 0)
    batches = run.sampler.iterate(run.train_set, run.batches_consumed, run.data_args.num_workers)
    progress = tqdm(total=args.max_steps, initial=run.step, desc="train tokenizer",
                    disable=not (args.progress_bar and run.accelerator.is_main_process))
    run.model.train()
    stop_at = min(args.max_steps, args.stop_after_step or args.max_steps)
    loop_started, first_step = time.perf_counter(), run.step
    # SIGTERM / SIGINT, or the launcher gone: every rank stops at the next step, after a checkpoint.
    stopper = StopOnSignal().install()
    try:
        while run.step < stop_at:
            batch = next(batches)
            run.batches_consumed += 1
            for sample_id, reason in batch["skipped"]:
                run.tracker.record_bad(sample_id, reason)
            run.tracker.record_ok(len(batch["ids"]))
            if batch["pixel_values"].shape[0] == 0:
                continue
            result = train_step(run, batch["pixel_values"].to(run.device))
            progress.update(1)
            _after_step(run, result, stop_at, progress)
            if run.step < stop_at and stopper.should_stop():
                logger.warning("stopping at step %d (%s), after a checkpoint; resume with --auto_resume true",
                               run.step, stopper.signalled or "a signal on another rank")
                if not (args.save_steps > 0 and run.step % args.save_steps == 0):
                    state.save(run)
                break
    finally:
        stopper.uninstall()
    progress.close()
    loop_time = time.perf_counter() - loop_started
    summary: dict[str, Any] = {
        "step": run.step, "bad_samples": run.tracker.summary(), "output_dir": str(run.output_dir),
        # Loop time includes the periodic sample grids, evaluations and checkpoints.
        "train_loop_s": loop_time, "seconds_per_step": loop_time / max(1, run.step - first_step),
    }
    if initial_eval is not None:
        summary["initial_eval"] = initial_eval
    return summary


def finish(run: TokenizerRun, summary: dict[str, Any]) -> dict[str, Any]:
    """After `max_steps`: the final evaluation, `model/` (and `model_ema/`), `results.json`."""
    run.tracker.check(final=True)
    summary["status"] = "finished"
    summary["final_eval"] = validate(run, run.step)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.unwrapped.save_pretrained(run.output_dir / "model")
        summary["model_path"] = str(run.output_dir / "model")
    if run.opt.ema is not None:
        # The averaged weights lent to the model itself: a deep copy would hold a second model (and the teacher).
        with run.opt.ema.applied(run.unwrapped) as ema_model:
            summary["ema_eval"] = validate(run, run.step, log=False)
            if run.accelerator.is_main_process:
                ema_model.save_pretrained(run.output_dir / "model_ema")
                summary["ema_model_path"] = str(run.output_dir / "model_ema")
    logger.info("finished: %s", _format(_flat({k: v for k, v in summary["final_eval"].items() if k != "codebooks"})))
    return summary


def train_tokenizer(
    model_args: TokenizerModelArguments,
    data_args: TokenizerDataArguments,
    loss_args: ReconstructionLossConfig,
    train_args: TokenizerTrainingArguments,
) -> dict[str, Any]:
    """Run (or resume) one tokenizer training job; returns a summary (also written to `results.json`)."""
    started = time.perf_counter()
    run = setup(model_args, data_args, loss_args, train_args)
    try:
        summary = fit(run)
        if run.step < train_args.max_steps:
            summary["status"] = "stopped"
            logger.info("stopped at step %d of %d (stop_after_step); resume with --auto_resume true", run.step,
                        train_args.max_steps)
            return summary
        summary = finish(run, summary)
        summary["wall_time_s"] = time.perf_counter() - started
        if run.accelerator.is_main_process:
            (run.output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if run.lock is not None:
            run.lock.release()


def _checked_resume(args: TokenizerTrainingArguments, output_dir: Path, fingerprint: dict) -> str | None:
    """Rank 0: the checkpoint to resume, refused when it records another run's fingerprint."""
    checkpoint = state.resume_path(args, output_dir)
    if checkpoint is not None:
        check_resume_fingerprint(checkpoint, fingerprint, args.allow_resume_config_change)
    return str(checkpoint) if checkpoint is not None else None


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested result dicts as one level: {"semantic": {"layer": {"cosine": c}}} -> {"semantic/layer/cosine": c}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _scalar_logs(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.detach().float())
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def _format(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
