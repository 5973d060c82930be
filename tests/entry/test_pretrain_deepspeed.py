"""`deepspeed --num_gpus 2 scripts/pretrain.py` on CPU (two gloo ranks) with ZeRO-2 and ZeRO-3, and the same
program under `torchrun --nproc_per_node 2` (plain DDP).

One uninterrupted ZeRO-2 run (checkpoints at steps 2 and 4) is the reference: its losses fall; a run started from
its step-2 checkpoint (as after a crash) logs the same losses for steps 3-4; a ZeRO-3 run logs the same losses
and saves the same gathered final weights, which `UniMMForCausalLM.from_pretrained` loads in one process.

Crash-safe resume: a run killed -9 while the Trainer writes `checkpoint-4` leaves that folder in one of the states
of the stock save order (folder created; model written; model + DeepSpeed optimizer shards written, the last one
torn; everything but the trainer state). Each state is rebuilt from the reference run's files; relaunching the
same command must skip it with a warning naming it, resume from the complete `checkpoint-2`, log exactly the
reference losses, and end with every step logged once and `checkpoint-4` complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.entry.conftest import deepspeed_launcher, log_history, run_script, torchrun_launcher

pytestmark = pytest.mark.slow

STEPS = 4


def pretrain_args(toy, output_dir, zero: str) -> list[str]:
    return [
        "scripts/pretrain.py", "--deepspeed", f"configs/deepspeed/{zero}.json",
        "--llm_path", str(toy["llm"]), "--tokenizer_path", str(toy["tokenizer"]), "--code_cache", str(toy["cache"]),
        "--model_config_overrides", '{"depth_head_layers": 1}', "--max_length", "64", "--num_samples", "64",
        "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "7",
        # as the shipped pretraining recipes run: packed rows and accumulation > 1 (ZeRO-2, ZeRO-3 and DDP must agree)
        "--packing", "true", "--gradient_accumulation_steps", "2",
    ]


@pytest.fixture(scope="module")
def zero2_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_zero2")
    launcher = deepspeed_launcher()
    run_script(pretrain_args(toy, out, "zero2"), launcher=launcher)
    assert not shm_buffers(launcher)  # each rank removed its 66 MB shared-memory all-reduce buffer at exit
    return out


def shm_buffers(launcher: list[str]) -> list[Path]:
    """The all-reduce buffers DeepSpeed's CPU ranks of this launch (named by its master port) left in /dev/shm."""
    port = launcher[launcher.index("--master_port") + 1]
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def losses(output_dir) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history(output_dir)}


def test_zero2_losses_fall_and_parts_are_logged(zero2_run):
    history = log_history(zero2_run)
    assert [entry["step"] for entry in history] == list(range(1, STEPS + 1))
    assert history[-1]["loss"] < history[0]["loss"]
    for entry in history:
        assert {"text_loss", "visual_loss/pixel", "visual_loss/semantic"} <= set(entry)
        assert entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1
    assert (zero2_run / "resolved_config.yaml").is_file()
    assert (zero2_run / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed engine state for exact resume


def test_resume_from_checkpoint_reproduces_losses(zero2_run, toy, tmp_path):
    # A run killed after its step-2 checkpoint: its output_dir holds only that checkpoint; relaunching the same
    # command resumes from it (auto_resume) and must log the reference run's losses for the remaining steps.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(zero2_run / "checkpoint-2", resumed / "checkpoint-2")
    run_script(pretrain_args(toy, resumed, "zero2"), launcher=deepspeed_launcher())
    reference, after = losses(zero2_run), losses(resumed)
    for step in (3, 4):
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)


def test_zero3_matches_zero2_and_final_model_loads(zero2_run, toy, tmp_path):
    from unimm.llm import UniMMForCausalLM

    out = tmp_path / "zero3"
    run_script(pretrain_args(toy, out, "zero3"), launcher=deepspeed_launcher())
    reference, zero3 = losses(zero2_run), losses(out)
    assert sorted(zero3) == sorted(reference)
    for step in reference:
        assert zero3[step] == pytest.approx(reference[step], rel=2e-3)
    # The final ZeRO-3 model is gathered into ordinary HF weights, loadable in one process, and equal (up to
    # the accumulated reduction-order noise) to the ZeRO-2 model.
    model3 = UniMMForCausalLM.from_pretrained(out)
    model2 = UniMMForCausalLM.from_pretrained(zero2_run)
    assert model3.config.layout == model2.config.layout
    params2 = dict(model2.named_parameters())
    for name, param in model3.named_parameters():
        assert param.shape == params2[name].shape, name
        # Adam moves an element by about the learning rate whatever its gradient's size, so where a gradient is
        # near zero the two engines' reduction orders can flip its sign (measured: ~0.1% of elements, by up to
        # 2 x lr); every other element agrees to float32 noise.
        diff = (param - params2[name]).abs()
        assert diff.median() < 1e-5 and (diff > 1e-3).float().mean() < 0.02, (name, diff.max())


def test_torchrun_ddp_is_one_job_matching_deepspeed(zero2_run, toy, tmp_path):
    """Without --deepspeed, `torchrun` ranks must train one model together (DDP), not one model each: the logged
    losses (means over both ranks' batches) equal the ZeRO-2 run's, which sees the same batches."""
    out = tmp_path / "ddp"
    args = pretrain_args(toy, out, "zero2")
    del args[1:3]  # no --deepspeed
    run_script(args, launcher=torchrun_launcher())
    reference, ddp = losses(zero2_run), losses(out)
    assert sorted(ddp) == sorted(reference)
    for step in reference:
        assert ddp[step] == pytest.approx(reference[step], rel=2e-3)


def _interrupted_checkpoint(reference: Path, target: Path, state: str) -> None:
    """`target` as a kill -9 during the reference run's save of `checkpoint-4` would leave it in `state`."""
    source = reference / "checkpoint-4"
    target.mkdir()
    if state == "folder":
        return
    model_files = [f for f in source.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json", ".jinja")
                   and f.name != "trainer_state.json"]
    for file in model_files:
        shutil.copy2(file, target / file.name)
    if state == "model":
        return
    shutil.copytree(source / "global_step4", target / "global_step4")
    if state == "optimizer_torn":
        # The kill landed while DeepSpeed wrote rank 1's optimizer shard: half of it is on disk.
        shard = sorted((target / "global_step4").glob("*optim_states.pt"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return
    for file in source.iterdir():  # everything the stock save writes except its last file, the trainer state
        if file.is_file() and file.name not in ("trainer_state.json", "COMPLETE") and not (target / file.name).exists():
            shutil.copy2(file, target / file.name)
    assert state == "before_trainer_state", state


@pytest.mark.parametrize("state", ["folder", "model", "optimizer_torn", "before_trainer_state"])
def test_kill_during_checkpoint_save_resumes_from_last_complete(zero2_run, toy, tmp_path, state):
    assert (zero2_run / "checkpoint-2" / "COMPLETE").is_file() and (zero2_run / "checkpoint-4" / "COMPLETE").is_file()
    run = tmp_path / "killed"
    run.mkdir()
    shutil.copytree(zero2_run / "checkpoint-2", run / "checkpoint-2")
    shutil.copy2(zero2_run / "resolved_config.yaml", run / "resolved_config.yaml")
    _interrupted_checkpoint(zero2_run, run / "checkpoint-4", state)

    # One case also keeps a single checkpoint: the old one may go only once the new one is complete.
    limit = ["--save_total_limit", "1"] if state == "before_trainer_state" else []
    proc = run_script(pretrain_args(toy, run, "zero2") + limit, launcher=deepspeed_launcher())
    output = proc.stdout + proc.stderr
    assert f"ignoring incomplete checkpoint {run / 'checkpoint-4'}" in output
    assert f"resuming from the latest complete checkpoint {run / 'checkpoint-2'}" in output
    reference, after = losses(zero2_run), losses(run)
    assert [entry["step"] for entry in log_history(run)] == list(range(1, STEPS + 1))  # no step twice
    for step in (3, 4):
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    assert (run / "checkpoint-4" / "COMPLETE").is_file()
    assert (run / "checkpoint-2").is_dir() == (not limit)
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == STEPS


def test_explicit_resume_from_incomplete_checkpoint_is_refused(zero2_run, toy, tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    _interrupted_checkpoint(zero2_run, run / "checkpoint-4", "model")
    args = pretrain_args(toy, run, "zero2") + ["--resume_from_checkpoint", str(run / "checkpoint-4")]
    del args[1:3]  # refused before DeepSpeed would start: one plain process is enough
    with pytest.raises(AssertionError, match=r"checkpoint-4 is not a complete checkpoint"):
        run_script(args)


def test_real_kill_during_checkpoint_save_then_relaunch(zero2_run, toy, tmp_path):
    """A real kill -9 of the launcher and both ranks the moment `checkpoint-4` appears (so, most likely, in the
    middle of writing it): the relaunch resumes from the newest complete checkpoint and ends with the
    uninterrupted run's losses, every step logged once."""
    import os
    import sys

    from tests.entry.conftest import REPO
    from unimm.testing import kill_when_path_appears

    run = tmp_path / "killed"
    args = pretrain_args(toy, run, "zero2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    killed = deepspeed_launcher()
    state = kill_when_path_appears(killed + args, run / "checkpoint-4", REPO, env, timeout=600, poll=0.005)
    print(f"checkpoint-4 when killed: {state}", file=sys.stderr)
    for buffer in shm_buffers(killed):  # a killed rank cannot remove its all-reduce buffer
        buffer.unlink()
    run_script(args, launcher=deepspeed_launcher())
    reference, after = losses(zero2_run), losses(run)
    assert [entry["step"] for entry in log_history(run)] == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    assert (run / "checkpoint-4" / "COMPLETE").is_file()
