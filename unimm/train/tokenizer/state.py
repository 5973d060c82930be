"""Tokenizer-trainer checkpoints: accelerate's `save_state` / `load_state` under the project's completeness rule.

One checkpoint is `<output_dir>/checkpoint-<step>/`:
  `model.safetensors`, `model_1.safetensors`  the tokenizer and (with a GAN) the discriminator   (accelerate)
  `optimizer.bin`, `optimizer_1.bin`, `scheduler.bin`, `scheduler_1.bin`                       (accelerate)
  `random_states_<rank>.pkl`                  every rank's Python, NumPy, torch and CUDA RNG states (accelerate)
  `ema.safetensors`                           the EMA shadow weights, when EMA is on
  `trainer_state.json`                        step, data position (batches consumed), bad-sample counts
  `COMPLETE`                                  written last, after every rank finished (`unimm.train.checkpoint`)
Auto-resume takes the newest checkpoint with its `COMPLETE` marker, so a run killed during a save resumes from the
previous one. Before anything is read, every pickle-based file of the checkpoint must load with `weights_only=True`
and the checkpoint allow-list (`unimm.train.checkpoint.verify_checkpoint_files`), and this rank's RNG states must be
there: accelerate would otherwise carry on with a fresh RNG, noted only at INFO, and the resume would not be exact.
Checkpoints in the earlier format (`model.pt`, `optimizer.pt`, ..., `rng_state_<rank>.pt`, written by
`unimm.train.checkpoint.save_checkpoint`) still resume, through `unimm.train.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unimm.train.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    mark_complete,
    prune_checkpoints,
    resolve_resume,
    verify_checkpoint_files,
)
from unimm.utils.errors import UserError

if TYPE_CHECKING:
    from unimm.train.tokenizer.args import TokenizerTrainingArguments
    from unimm.train.tokenizer.loop import TokenizerRun

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
EARLIER_FORMAT_FILE = "model.pt"  # the tokenizer's state dict in checkpoints written before accelerate's format


def resume_path(args: TokenizerTrainingArguments, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume_from_checkpoint` (it must be complete; 'auto' means the newest in
    output_dir), else with `auto_resume` the newest complete checkpoint in output_dir, else none."""
    if args.resume_from_checkpoint:
        return resolve_resume(args.resume_from_checkpoint, output_dir)
    return latest_checkpoint(output_dir) if args.auto_resume else None


def trainer_state(run: TokenizerRun) -> dict[str, Any]:
    return {"step": run.step, "batches_consumed": run.batches_consumed, "bad_samples": run.tracker.summary()}


def save(run: TokenizerRun) -> Path:
    """Write `checkpoint-<step>` (every rank takes part), mark it complete, prune to `save_total_limit`."""
    accelerator = run.accelerator
    path = checkpoint_dir(run.output_dir, run.step)
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        if run.opt.ema is not None:
            ema = run.opt.ema.state_dict()
            save_file({name: t.contiguous() for name, t in ema["shadow"].items()}, path / EMA_FILE,
                      metadata={"decay": repr(ema["decay"]), "num_updates": str(ema["num_updates"])})
        (path / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state(run), indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.fingerprint is not None:
            from unimm.train.guards import write_fingerprint

            write_fingerprint(path, run.fingerprint)
        mark_complete(path, run.step)
        prune_checkpoints(run.output_dir, run.args.save_total_limit)
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", path)
    return path


def load(run: TokenizerRun, path: Path) -> None:
    """Restore every state of `run` (weights, optimisers, schedules, EMA, RNG, data position) from `path`."""
    verify_checkpoint_files(path)
    if (path / EARLIER_FORMAT_FILE).is_file():
        _load_earlier_format(run, path)
    else:
        _require_rng_states(path, run.accelerator.process_index)
        run.accelerator.load_state(str(path))
        if run.opt.ema is not None:
            _load_ema(run, path)
    state = json.loads((path / TRAINER_STATE_FILE).read_text())
    run.step, run.batches_consumed = int(state["step"]), int(state["batches_consumed"])
    bad = state["bad_samples"]
    run.tracker.num_ok, run.tracker.num_bad = bad["num_ok"], bad["num_bad"]
    run.tracker.bad_examples = [tuple(x) for x in bad["bad_examples"]]
    run.resumed_from = path
    logger.info("resumed from %s (step %d)", path, run.step)


def _require_rng_states(path: Path, process_index: int) -> None:
    """This rank's RNG states (already checked to be plain data) must exist and hold what accelerate restores."""
    import torch

    from unimm.train.checkpoint import checkpoint_safe_globals

    file = path / f"random_states_{process_index}.pkl"
    if not file.is_file():
        raise UserError(f"{file}: missing: the checkpoint has no RNG states for process {process_index}, so the "
                        "resume would not be exact; resume from another checkpoint")
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        states = torch.load(file, map_location="cpu", weights_only=True)
    missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states if isinstance(states, dict)
                                                                               else ())
    if missing:
        raise UserError(f"{file}: not accelerate's RNG states (missing {sorted(missing)}); resume from another "
                        "checkpoint")


def _load_ema(run: TokenizerRun, path: Path) -> None:
    file = path / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no EMA state ({EMA_FILE}) but this run has ema_decay > 0")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    run.opt.ema.load_state_dict({"decay": float(metadata["decay"]), "num_updates": int(metadata["num_updates"]),
                                 "shadow": load_file(file, device=str(run.accelerator.device))})


def _load_earlier_format(run: TokenizerRun, path: Path) -> None:
    """A checkpoint of the trainer before it used accelerate's format: one `<name>.pt` state dict per object."""
    logger.warning("%s is a checkpoint in the earlier tokenizer format (%s, ...): resuming from it; the next "
                   "checkpoints are written in accelerate's format", path, EARLIER_FORMAT_FILE)
    objects: dict[str, Any] = {
        "model": run.unwrapped, "optimizer": run.opt.optimizer, "scheduler": run.opt.scheduler,
    }
    if run.discriminator is not None:
        objects.update(discriminator=run.accelerator.unwrap_model(run.discriminator),
                       disc_optimizer=run.opt.disc_optimizer, disc_scheduler=run.opt.disc_scheduler)
    if run.opt.ema is not None:
        objects["ema"] = run.opt.ema
    load_checkpoint(path, objects)
