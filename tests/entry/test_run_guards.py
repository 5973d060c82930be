"""Runs you can trust (`unimm.train.guards`), through the real pretraining program: divergence stops the run
without writing non-finite weights, a checkpoint of another run is refused, one run per folder, and a SIGTERM to the
`deepspeed` runner alone stops every rank after a checkpoint instead of leaving them training as orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO, deepspeed_launcher, log_history
from unimm.cli import pretrain

pytestmark = pytest.mark.slow


def _args(toy, output_dir, *extra: str) -> list[str]:
    return ["--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache",
            str(toy["cache"]), "--depth_head_layers", "1", "--max_length", "64", "--num_samples", "16",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--warmup_steps", "0",
            "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--use_cpu", "true", "--seed", "3", "--output_dir", str(output_dir),
            *extra]


def _one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert lines, "no error line on stderr"
    return lines[-1]


@pytest.fixture
def finished_run(toy, tmp_path):
    out = tmp_path / "run"
    pretrain.main(_args(toy, out))
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    return out


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(toy, tmp_path, capsys):
    """Learning rate 1e20: the first step leaves huge but finite weights (saved as checkpoint-1), the second step's
    loss is not finite: one line naming the step, exit 2; nothing written from non-finite weights (no later
    checkpoint, no final model), checkpoint-1 kept."""
    from unimm.train.checkpoint import is_complete

    out = tmp_path / "diverged"
    line = _one_line_error(capsys, lambda: pretrain.main(_args(
        toy, out, "--learning_rate", "1e20", "--max_steps", "6", "--save_steps", "1")))
    assert "training diverged at step" in line and "the last complete one is kept" in line, line
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved and all(is_complete(out / name) for name in saved)
    for name in saved:
        from safetensors.torch import load_file

        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), name
    assert not (out / "model.safetensors").exists()


def test_nonfinite_loss_parts_are_logged_as_nan_not_dropped():
    from types import SimpleNamespace

    from unimm.train.llm.trainer import UniMMTrainer

    trainer = UniMMTrainer.__new__(UniMMTrainer)
    trainer._reset_window()
    trainer._record_parts(SimpleNamespace(text_loss=torch.tensor(float("nan")),
                                          visual_losses={"pixel": torch.tensor(float("inf"))}))
    assert trainer._part_counts == {"text_loss": 1, "visual_loss/pixel": 1}
    assert trainer._part_sums["text_loss"] != trainer._part_sums["text_loss"]  # nan, shown as nan in the log
    assert trainer._part_sums["visual_loss/pixel"] == float("inf")


def test_resuming_another_runs_checkpoint_is_refused(toy, finished_run, capsys):
    """Same folder, another learning rate and max_length: refused in one line naming the keys, and the run's
    resolved_config.yaml is left as it was; --allow_resume_config_change resumes it with a warning."""
    record = (finished_run / "resolved_config.yaml").read_text()
    line = _one_line_error(capsys, lambda: pretrain.main(_args(
        toy, finished_run, "--learning_rate", "2e-3", "--max_length", "48", "--max_steps", "4")))
    assert "checkpoint-2 belongs to another run" in line
    assert "learning_rate: 0.001 -> 0.002" in line and "max_length: 64 -> 48" in line
    assert (finished_run / "resolved_config.yaml").read_text() == record
    assert not (finished_run / "checkpoint-4").exists()

    pretrain.main(_args(toy, finished_run, "--learning_rate", "2e-3", "--max_steps", "4",
                        "--allow_resume_config_change", "true"))
    assert (finished_run / "checkpoint-4" / "COMPLETE").is_file()
    assert [e["step"] for e in log_history(finished_run)][-2:] == [3, 4]


def test_one_run_per_folder(toy, tmp_path, capsys):
    """A live run's lock (this host, a live pid) stops a second run at once; a lock whose process is gone is taken
    over; a finished run leaves no lock behind."""
    from unimm.train.guards import LOCK_FILE

    out = tmp_path / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid,
                                                 "started": "2026-12-06 10:00:00"}))
        line = _one_line_error(capsys, lambda: pretrain.main(_args(toy, out)))
        assert "is in use by another run" in line and str(sleeper.pid) in line
        assert not (out / "resolved_config.yaml").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    pretrain.main(_args(toy, out))  # the holder is gone: its lock is stale
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    assert not (out / LOCK_FILE).exists()


def _rank_processes(output_dir: Path) -> list[int]:
    """Pids of processes whose command line names `output_dir` (the ranks and the launchers of one run)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if str(output_dir).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("target", ["runner", "group"])
def test_sigterm_stops_every_rank_after_a_checkpoint(toy, tmp_path, target):
    """runner: what a container runtime does to PID 1, SIGTERM to the `deepspeed` runner only: every rank notices its
    launcher is gone, saves a complete checkpoint at the next step and exits; none keeps training as an orphan.
    group: SIGTERM to the whole process group (Ctrl-C, a scheduler's kill): every rank stops at the same step
    boundary, after a complete checkpoint, and removes its shared-memory buffer."""
    out = tmp_path / "signal"
    args = _args(toy, out, "--max_steps", "100000", "--save_steps", "2", "--logging_steps", "1")
    args = [a for a in args if a not in ("--use_cpu", "true")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*deepspeed_launcher(), str(REPO / "scripts" / "pretrain.py"), "--deepspeed",
               str(REPO / "configs/deepspeed/zero2.json"), *args]
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # training runs (its signal handlers are in place) once the first periodic checkpoint is complete
        while not (out / "checkpoint-2" / "COMPLETE").is_file():
            assert runner.poll() is None, "the run ended before it was signalled"
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        if target == "runner":
            runner.send_signal(signal.SIGTERM)  # the runner only, not its process group
        else:
            os.killpg(runner.pid, signal.SIGTERM)
        deadline = time.monotonic() + 180
        while _rank_processes(out):
            assert time.monotonic() < deadline, f"ranks still running after the runner exited: {_rank_processes(out)}"
            time.sleep(0.5)
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        runner.wait()
    from unimm.train.checkpoint import latest_checkpoint

    # the save on the signal: a complete checkpoint after the periodic checkpoint-2
    newest = latest_checkpoint(out)
    assert newest is not None and int(newest.name.split("-")[1]) > 2, newest
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"
                                          f"_{command[command.index('--master_port') + 1]}_*"))


def test_fingerprint_refuses_world_size_engine_and_lora_changes(tmp_path):
    """The keys a relaunch may not change without becoming another run: a 2-rank DeepSpeed checkpoint resumed by
    one process without DeepSpeed (world size and engine), a LoRA alpha change (the adapter delta would scale); the
    step budget and cadence may change."""
    from unimm.train.guards import check_resume_fingerprint, run_fingerprint, write_fingerprint
    from unimm.utils.errors import UserError

    resolved = {"learning_rate": 1e-3, "lora_alpha": 32, "max_steps": 30, "save_steps": 10, "output_dir": "a"}
    zero2 = REPO / "configs/deepspeed/zero2.json"
    write_fingerprint(tmp_path, run_fingerprint(resolved, 2, str(zero2)))
    relaunch = {**resolved, "max_steps": 60, "save_steps": 20, "output_dir": "b"}
    check_resume_fingerprint(tmp_path, run_fingerprint(relaunch, 2, str(zero2)), allow_change=False)
    with pytest.raises(UserError, match=r"deepspeed: \{.*-> null.*world_size: 2 -> 1"):
        check_resume_fingerprint(tmp_path, run_fingerprint(relaunch, 1, None), allow_change=False)
    with pytest.raises(UserError, match="lora_alpha: 32 -> 128"):
        check_resume_fingerprint(tmp_path, run_fingerprint({**relaunch, "lora_alpha": 128}, 2, str(zero2)),
                                 allow_change=False)
    check_resume_fingerprint(tmp_path, run_fingerprint({**relaunch, "lora_alpha": 128}, 2, str(zero2)),
                             allow_change=True)  # warns, resumes
