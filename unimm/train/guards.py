"""What keeps a training run trustworthy, apart from the training itself (the LLM programs and the tokenizer trainer):

- `RunLock`: one run per output folder. A lock file (host, pid, start time) is taken before anything is written; a
  second concurrent run stops at once with one line, a lock left by a dead process on this host is taken over.
- The run fingerprint: the resolved config minus what may change on a relaunch (step budget, save / log / eval
  cadence, output paths, data-loader workers), plus the world size, the DeepSpeed config and the LoRA config. Each
  checkpoint records it (`unimm_run.json`); resuming another run's checkpoint is refused with one line naming the keys
  that differ, unless `--allow_resume_config_change true` (then a warning lists them).
- Divergence: a non-finite loss on any rank stops training with one line naming the step, and no checkpoint (nor the
  final model) is written from non-finite weights, so pruning never removes the last finite checkpoint.
- Signals: SIGTERM / SIGINT to a rank, or the death of the launcher that started it, stop every rank at the next step
  boundary, after a checkpoint when `--save_on_signal` is set.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from unimm.utils.distributed import all_reduce_sum, get_rank, get_world_size
from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".unimm_run.lock"
FINGERPRINT_FILE = "unimm_run.json"
# Keys a relaunch may change without becoming another run.
RELAUNCH_KEYS = frozenset({
    "max_steps", "num_train_epochs", "save_steps", "save_strategy", "save_total_limit", "logging_steps",
    "logging_strategy", "logging_dir", "logging_first_step", "eval_steps", "eval_strategy", "output_dir",
    "run_name", "resume_from_checkpoint", "auto_resume", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "report_to", "save_final_model", "save_on_signal",
    "allow_resume_config_change", "disable_tqdm", "log_level", "log_level_replica", "local_rank", "peak_tflops",
    "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_token", "debug", "ddp_timeout", "log_sample_ids",
    # the tokenizer trainer's cadence and stop point
    "stop_after_step", "sample_steps", "num_sample_images",
})


class DivergenceError(UserError):
    """Training produced a non-finite loss or weights."""


# ------------------------------------------------------------------------------------------- rank 0 decides


def rank0_decides(decide: Any) -> Any:
    """Run `decide()` on global rank 0 and give every rank its result; an exception there is raised on every rank
    (rank 0's own, the others a `UserError` quoting it), so no rank waits for a collective the others left."""
    from unimm.utils.distributed import broadcast_object, is_main_process

    outcome: tuple[str, Any] | None = None
    failure: Exception | None = None
    if is_main_process():
        try:
            outcome = ("ok", decide())
        except Exception as err:  # every rank must learn of it
            outcome, failure = ("error", str(err)), err
    status, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if status == "error":
        raise UserError(f"rank 0 stopped the run: {value}")
    return value


# ---------------------------------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on an output folder, held by global rank 0 for the whole run."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_stale(holder):
                    logger.warning("%s: taking over a lock left by a process that is gone (%s)", self.path, holder)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(f"{self.path.parent} is in use by another run (host {holder and holder.get('host')}, "
                                f"pid {holder and holder.get('pid')}, started {holder and holder.get('started')}); "
                                f"use another --output_dir, or delete {self.path} if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the run lock")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # being written right now, or torn: treat as held

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process cannot be checked from here
        try:
            return not _alive(int(holder["pid"]))
        except (KeyError, TypeError, ValueError):
            return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ---------------------------------------------------------------------------------------------- fingerprint


def run_fingerprint(resolved: dict[str, Any], world_size: int, deepspeed_config: Any) -> dict[str, Any]:
    """What makes a run this run: `resolved` (the resolved config, `unimm.utils.config.config_to_dict`) without the
    relaunch keys, the world size and the DeepSpeed config (its contents, not its path)."""
    fingerprint = {k: v for k, v in resolved.items() if k not in RELAUNCH_KEYS and k != "deepspeed"}
    if isinstance(deepspeed_config, str | os.PathLike) and Path(deepspeed_config).is_file():
        deepspeed_config = json.loads(Path(deepspeed_config).read_text())
    fingerprint["deepspeed"] = deepspeed_config or None
    fingerprint["world_size"] = world_size
    return json.loads(json.dumps(fingerprint, default=str))  # plain JSON values, as read back from disk


def write_fingerprint(checkpoint: str | Path, fingerprint: dict[str, Any]) -> None:
    path = Path(checkpoint) / FINGERPRINT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, path)


# Config keys renamed since a fingerprint may have been recorded (old -> new): a checkpoint written under the old name
# still resumes (the value is compared under the new one).
RENAMED_KEYS = {"torch_dtype": "dtype"}


def differing_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def check_resume_fingerprint(checkpoint: str | Path, current: dict[str, Any], allow_change: bool) -> None:
    """Refuse to resume `checkpoint` when it belongs to another run (one line naming the keys that differ), or warn
    when `allow_change`. Checkpoints written before fingerprints existed resume with a warning."""
    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.is_file():
        logger.warning("%s records no run fingerprint (written by an older UniMM): resuming without checking that it "
                       "belongs to this run", checkpoint)
        return
    recorded = {RENAMED_KEYS.get(key, key): value for key, value in json.loads(path.read_text()).items()}
    keys = differing_keys(recorded, current)
    if not keys:
        return
    detail = ", ".join(f"{k}: {_short(recorded.get(k))} -> {_short(current.get(k))}" for k in keys[:8])
    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
    if allow_change:
        logger.warning("resuming %s with a changed configuration: %s%s", checkpoint, detail, more)
        return
    raise UserError(f"{checkpoint} belongs to another run: {detail}{more}; use another --output_dir, or pass "
                    f"--allow_resume_config_change true to resume it anyway")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ divergence


def holds_on_every_rank(value: bool) -> bool:
    """Whether `value` holds on every rank (one all-reduce)."""
    bad = torch.tensor([0.0 if value else 1.0], dtype=torch.float64)
    return float(all_reduce_sum(bad)[0]) == 0.0


def local_weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter this rank holds is finite (its ZeRO-3 partition, where partitioned)."""
    for param in model.parameters():
        data = getattr(param, "ds_tensor", None)
        data = param.data if data is None or param.numel() > 0 else data
        if data.numel() and data.is_floating_point() and not bool(torch.isfinite(data).all()):
            return False
    return True


def check_weights_before_save(model: torch.nn.Module, step: int, what: str) -> None:
    """Every rank: refuse to write `what` from non-finite weights (collective)."""
    if not holds_on_every_rank(local_weights_finite(model)):
        raise DivergenceError(f"training diverged by step {step}: the weights are not finite; {what} was not "
                              f"written, the last complete checkpoint is kept (lower the learning rate or resume "
                              f"from it)")


# --------------------------------------------------------------------------------------------------- signals


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT on any rank, or this rank's launcher gone: every rank stops at the next step boundary (the
    flag is all-reduced, so they stop at the same step), after a checkpoint when `save` is set."""

    def __init__(self, save: bool = True):
        self.save = save
        self.signalled: str | None = None
        self.launcher_pid = _launcher_pid()
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; the launcher check still runs
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signalled is not None:
            # Launchers forward a signal they receive (DeepSpeed's launch.py sends SIGTERM to ranks that the
            # process-group signal already reached): only a second SIGINT (Ctrl-C twice) means "stop now".
            if signum == signal.SIGINT and self.signalled == name:
                raise KeyboardInterrupt
            return
        self.signalled = name

    def _launcher_gone(self) -> bool:
        return self.launcher_pid is not None and not _alive(self.launcher_pid)

    def should_stop(self) -> bool:
        """At a step boundary, on every rank (collective): whether any rank was signalled or lost its launcher."""
        if self.signalled is None and self._launcher_gone():
            self.signalled = "launcher exit"
        return not holds_on_every_rank(self.signalled is None)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.should_stop():
            return control
        logger.warning("rank %d: stopping at step %d (%s on a rank)%s", get_rank(), state.global_step,
                       self.signalled or "a signal", ", saving a checkpoint first" if self.save else "")
        control.should_training_stop = True
        control.should_save = self.save
        return control


def _launcher_pid() -> int | None:
    """The pid of the launcher (deepspeed runner / torchrun agent) whose death must end this rank: the parent of
    `deepspeed.launcher.launch` under the deepspeed runner, else the direct parent; None for a plain process."""
    if get_world_size() == 1 and "LOCAL_RANK" not in os.environ:
        return None
    parent = os.getppid()
    grandparent = _parent_of(parent)
    if grandparent and "deepspeed" in _cmdline(parent) and "launch" in _cmdline(parent):
        return grandparent
    return parent


def _parent_of(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X") and pid != 1
