"""Engine state for exact resume: model/optimizer/scheduler state dicts, RNG states and the data position.

Layout of one checkpoint (`<output_dir>/checkpoint-<step>/`):
  `<name>.pt`         one state dict per registered object (models, optimizers, schedulers, EMA, ...)
  `rng_state_<rank>.pt` Python, NumPy, torch CPU and CUDA RNG states of that rank
  `trainer_state.json` step, data position and any extra JSON-serialisable values
  `COMPLETE`           written last; checkpoints without it (an interrupted save) are ignored
Everything is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unimm.utils.distributed import barrier, get_rank, is_main_process

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses; store it as a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / "COMPLETE").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None`/"" -> no resume; "auto" -> latest complete checkpoint in `output_dir` (None if there is none);
    otherwise a checkpoint directory that must exist and be complete."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint directory (no COMPLETE marker)")
    return path


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    objects: dict[str, Stateful],
    trainer_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save `objects` (rank 0) and every rank's RNG state; prune to the newest `keep_last` checkpoints."""
    path = checkpoint_dir(output_dir, step)
    if is_main_process():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        for name, obj in objects.items():
            torch.save(obj.state_dict(), path / f"{name}.pt")
        state = {"step": step, **(trainer_state or {})}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
    barrier()
    torch.save(rng_state(), path / f"rng_state_{get_rank()}.pt")
    barrier()
    if is_main_process():
        (path / "COMPLETE").write_text(str(step))
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    logger.info("saved checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path, objects: dict[str, Stateful], restore_rng: bool = True) -> dict[str, Any]:
    """Load state dicts into `objects` (each must have a file in the checkpoint) and return the trainer state."""
    path = Path(path)
    for name, obj in objects.items():
        file = path / f"{name}.pt"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no state for {name!r} ({file.name})")
        obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    if restore_rng:
        rng_file = path / f"rng_state_{get_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        else:
            logger.warning("checkpoint %s has no RNG state for rank %d; continuing with fresh RNG", path, get_rank())
    state = json.loads((path / "trainer_state.json").read_text())
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state
