"""Engine state for exact resume: model/optimizer/scheduler state dicts, RNG states and the data position.

Layout of one checkpoint (`<output_dir>/checkpoint-<step>/`):
  `<name>.pt`         one state dict per registered object (models, optimizers, schedulers, EMA, ...)
  `rng_state_<rank>.pt` Python, NumPy, torch CPU and CUDA RNG states of that rank
  `trainer_state.json` step, data position and any extra JSON-serialisable values
  `COMPLETE`           written last; checkpoints without it (an interrupted save) are ignored
Everything is read with `torch.load(weights_only=True)`.

Before any resume reads a checkpoint (ours, the Hugging Face `Trainer`'s with DeepSpeed's engine state under
`global_step*/`, or accelerate's), `verify_checkpoint_files` unpickles every pickle-based file in it with
`weights_only=True` and an explicit allow-list of the classes those libraries genuinely store
(`checkpoint_safe_globals`). DeepSpeed itself loads its files with `weights_only=False`, so a file planted in a run
folder would otherwise run its code at the next relaunch; a file that needs anything else is refused, by name,
before any library opens it. `training_args.bin` (a pickled `TrainingArguments`, which builds accelerate state when
unpickled) is never read: resume does not need it, and nothing here or in the `Trainer` unpickles it.

The completeness rule is shared with the LLM side (`unimm.train.llm.trainer`, whose checkpoints the Hugging Face
`Trainer` writes): a `checkpoint-<step>` folder counts only once `COMPLETE` exists in it (`mark_complete`, after
every rank finished writing), auto-resume takes the newest complete one and warns about newer incomplete ones
(`latest_checkpoint`), and pruning keeps the newest complete checkpoints (`prune_checkpoints`), so a process
killed at any point of a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unimm.utils.distributed import barrier, get_rank, is_main_process
from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


# ------------------------------------------------------------------------------------------ safe resume

# Files a resume may unpickle (torch.save / pickle formats); safetensors and JSON cannot carry code.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
# Written by the Trainer next to each checkpoint, read by nothing on resume: never unpickled, so never checked.
NEVER_READ_FILES = frozenset({"training_args.bin"})

# What DeepSpeed, transformers and accelerate genuinely store in the checkpoint files a resume reads, beyond the
# tensors, containers and dtypes torch's weights-only unpickler accepts anyway. Found by saving real checkpoints
# (ZeRO-2 and ZeRO-3 on 2 ranks, one process without DeepSpeed, LoRA, the tokenizer trainer) and reading what
# `weights_only=True` rejects; tests/entry/test_faults.py saves genuine ones again (a LoRA Trainer run, the tokenizer
# trainer, DeepSpeed engines of ZeRO-1/2/3 in float32 and bf16) and checks every file passes:
#   numpy arrays and dtypes      the NumPy RNG state in `rng_state*.pth` / `random_states_*.pkl`
#   DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses   `*optim_states.pt` (ZeRO-1/2/3, bf16)
# Each entry is "module:qualified name" (several names where a class moved between versions).
_SAFE_GLOBAL_NAMES = (
    ("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct"),
    ("numpy:ndarray",),
    ("numpy:dtype",),
    ("_codecs:encode",),
    ("deepspeed.runtime.fp16.loss_scaler:LossScaler",),
    ("deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",),
    ("deepspeed.runtime.zero.config:ZeroStageEnum",),
    ("deepspeed.utils.tensor_fragment:fragment_address",),
)


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would need arbitrary objects (and so possibly code) to be unpickled, or that is
    damaged; resume refuses it before any library opens it."""


def _resolve(name: str, load: bool) -> Any | None:
    """The object "module:qualname" names; None when its module is not installed, or (without `load`) not yet
    imported: DeepSpeed is imported only for a file that names one of its classes."""
    import importlib
    import sys

    module_name, _, attribute = name.partition(":")
    if not load and module_name.split(".")[0] not in sys.modules:
        return None
    try:
        obj = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None  # not installed here (or renamed): a file that needs it is refused
    return obj


def checkpoint_safe_globals(load: bool = False) -> list[Any]:
    """The allow-list for `torch.serialization.safe_globals`: each object of `_SAFE_GLOBAL_NAMES` under every name
    a pickle may give it (its own, plus the names it had in other versions). With `load`, modules not yet imported
    are imported to resolve their names."""
    allowed: list[Any] = [type(np.dtype(kind)) for kind in (np.uint32, np.int64, np.float32, np.float64)]
    for names in _SAFE_GLOBAL_NAMES:
        for name in names:
            obj = _resolve(name, load)
            if obj is None:
                continue
            module, _, qualname = name.partition(":")
            own = f"{getattr(obj, '__module__', module)}.{getattr(obj, '__qualname__', qualname)}"
            allowed.append(obj if own == f"{module}.{qualname}" else (obj, f"{module}.{qualname}"))
    return allowed


def _load_weights_only(file: Path, load: bool) -> None:
    with torch.serialization.safe_globals(checkpoint_safe_globals(load)):
        torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))


def verify_pickle_file(file: str | Path) -> None:
    """Unpickle `file` with `weights_only=True` and the checkpoint allow-list (memory-mapped, so tensors are not
    read); raise `UnsafeCheckpointError` naming it when it needs anything else, or cannot be read at all."""
    file = Path(file)
    allowed_names = {name.replace(":", ".") for names in _SAFE_GLOBAL_NAMES for name in names}
    try:
        try:
            _load_weights_only(file, load=False)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            if found is None or found.group(1) not in allowed_names:
                raise
            _load_weights_only(file, load=True)  # an allowed class whose module was not imported yet
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        needs = f"it needs {found.group(1)}, which " if found else "it holds objects that "
        raise UnsafeCheckpointError(
            f"{file}: refused to load this checkpoint file: {needs}a checkpoint may not contain (unpickling it "
            "could run code); if you did not write it, delete this checkpoint and resume from another one") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # unreadable (permissions, I/O): reported as such
        raise UnsafeCheckpointError(f"{file}: damaged checkpoint file, cannot be read "
                                    f"({' '.join(str(err).split())[:200]}); resume from another checkpoint") from None


def verify_checkpoint_files(path: str | Path) -> Path:
    """Check every pickle-based file under the checkpoint folder `path` (`verify_pickle_file`) before a resume
    reads any of them; returns `path`. `training_args.bin` is skipped: no resume reads it."""
    path = Path(path)
    for file in sorted(path.rglob("*")):
        if file.suffix in PICKLE_SUFFIXES and file.name not in NEVER_READ_FILES and file.is_file():
            verify_pickle_file(file)
    return path


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


def is_complete(path: str | Path) -> bool:
    """Whether the checkpoint folder `path` was fully written (its `COMPLETE` marker exists)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def mark_complete(path: str | Path, step: int) -> None:
    """Write the `COMPLETE` marker of `path` (atomically: a marker is either absent or whole). Call it on one
    process per node, after every rank has finished writing its part of the checkpoint (nodes sharing a filesystem
    write the same marker: each through its own temporary file)."""
    import socket

    path = Path(path)
    tmp = path / f".{COMPLETE_MARKER}.{socket.gethostname()}.{os.getpid()}.tmp"
    tmp.write_text(str(step))
    os.replace(tmp, path / COMPLETE_MARKER)


def _checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-<step>` folder under `output_dir`, complete or not, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    return [path for _, path in _checkpoint_folders(output_dir) if is_complete(path)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders without a `COMPLETE` marker (a save that was interrupted, or is under way), oldest first."""
    return [path for _, path in _checkpoint_folders(output_dir) if not is_complete(path)]


def latest_checkpoint(output_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under `output_dir` (None if there is none). With `warn`, logs a warning
    naming every newer checkpoint folder that is incomplete, so a skipped interrupted save is visible."""
    complete = list_checkpoints(output_dir)
    latest = complete[-1] if complete else None
    if warn:
        latest_step = int(_CHECKPOINT_RE.match(latest.name).group(1)) if latest is not None else -1
        for step, path in _checkpoint_folders(output_dir):
            if step > latest_step and not is_complete(path):
                logger.warning("ignoring incomplete checkpoint %s (no %s marker: its save was interrupted); "
                               "resuming from %s", path, COMPLETE_MARKER, latest or "the start")
    return latest


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None`/"" -> no resume; "auto" -> latest complete checkpoint in `output_dir` (None if there is none);
    otherwise a checkpoint directory that must exist and be complete. The checkpoint returned has passed
    `verify_checkpoint_files`."""
    if not resume:
        return None
    if resume == "auto":
        latest = latest_checkpoint(output_dir)
        return verify_checkpoint_files(latest) if latest is not None else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume: checkpoint directory {path} does not exist")
    if not is_complete(path):
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint directory (no {COMPLETE_MARKER} "
                                f"marker: its save was interrupted); pass an older checkpoint or 'auto'")
    return verify_checkpoint_files(path)


def prune_checkpoints(output_dir: str | Path, keep_last: int | None, protect: tuple[str | Path, ...] = ()) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (None/0: keep all), and every incomplete
    checkpoint older than the newest complete one (the leftovers of interrupted saves). Folders in `protect`
    (e.g. the best checkpoint) are kept. Call on one process."""
    complete = list_checkpoints(output_dir)
    if not complete:
        return
    keep = {Path(p).resolve() for p in protect}
    newest_step = int(_CHECKPOINT_RE.match(complete[-1].name).group(1))
    doomed = complete[:-keep_last] if keep_last else []
    doomed += [path for step, path in _checkpoint_folders(output_dir)
               if step < newest_step and not is_complete(path)]
    for path in doomed:
        if path.resolve() not in keep:
            logger.info("deleting checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def trim_jsonl_log(path: str | Path, last_step: int) -> int:
    """Drop the records of the JSON-lines log `path` whose `step` is after `last_step` (the step a run resumes
    from), so the replayed steps are not logged twice. A torn last line (a kill mid-write) is dropped too.
    Returns the number of lines removed; a missing file is left alone."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            removed += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > last_step:
            removed += 1
            continue
        kept.append(line)
    if removed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        logger.info("%s: removed %d record(s) after step %d (resumed run)", path, removed, last_step)
    return removed


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
        mark_complete(path, step)
        prune_checkpoints(output_dir, keep_last)
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
