"""Streamed data (`--streaming true`) through the real programs on two gloo ranks.

- Pretraining under `deepspeed --num_gpus 2` (ZeRO-2, packed rows, accumulation 2, modality grouping, two
  dataloader workers per rank: four readers) from a code cache of 10 shards: a run killed -9 right after its step-3 checkpoint (which falls mid-shard and mid-window for
  both ranks) and relaunched with the same command trains steps 4-6 on exactly the samples, and with exactly the
  losses, of an uninterrupted run (per-step sample ids from `--log_sample_ids`).
- Finetuning on conversations as two nodes without a shared filesystem: two `torchrun --nnodes 2` launches, each
  with its own data folder (the JSON Lines shards it reads, and only those) and its own output folder
  (`--save_on_each_node`): training runs, and a relaunch from each node's copy of the step-2 checkpoint trains
  steps 3-4 on the same samples with the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO, deepspeed_launcher, log_history, run_script
from tests.entry.test_pretrain_deepspeed import shm_buffers
from unimm.testing import kill_when_path_appears

pytestmark = pytest.mark.slow

COPIES, SHARD_SIZE = 6, 5  # 8 toy images x 6 = 48 records in 10 shards (5 per rank)


@pytest.fixture(scope="module")
def sharded_cache(toy, tmp_path_factory) -> Path:
    """The toy code cache's records, six copies of each under new ids, written as 10 shards."""
    from unimm.data.code_cache import load_code_cache, write_code_cache
    from unimm.tokenizer import load_tokenizer

    cache = load_code_cache(toy["cache"], None)
    rows = [cache[i] for i in range(len(cache))]
    ids = [f"{row['id']}#{copy}" for copy in range(COPIES) for row in rows]
    codes = {name: torch.stack([row["codes"][name] for row in rows] * COPIES).numpy() for name in cache.group_names}
    texts = [row["text"] for row in rows] * COPIES
    out = tmp_path_factory.mktemp("sharded") / "cache"
    write_code_cache(out, load_tokenizer(toy["tokenizer"]), ids, codes, texts, shard_size=SHARD_SIZE)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def pretrain_args(toy, cache: Path, output_dir: Path) -> list[str]:
    return [
        "scripts/pretrain.py", "--deepspeed", "configs/deepspeed/zero2.json",
        "--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache", str(cache),
        "--streaming", "true", "--shuffle_window", "4", "--look_ahead_batches", "2",
        "--group_by_modality_length", "true", "--log_sample_ids", "true",
        "--depth_head_layers", "1", "--max_length", "64", "--output_dir", str(output_dir),
        "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--report_to", "none", "--dataloader_num_workers", "2",
        "--seed", "7", "--packing", "true", "--gradient_accumulation_steps", "2",
    ]


def sample_log(output_dir: Path, rank: int) -> dict[int, list]:
    lines = (output_dir / "sample_ids" / f"rank{rank}.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [s["step"] for s in steps] == sorted({s["step"] for s in steps}), "a step logged twice"
    return {s["step"]: s["sample_ids"] for s in steps}


def _stream_states(state) -> list[dict]:
    """The `StreamingMixture` states inside a `StatefulDataLoader` state (one per dataloader worker)."""
    if isinstance(state, dict):
        if "streams" in state:
            return [state]
        return [found for value in state.values() for found in _stream_states(value)]
    return []


def losses(output_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history(output_dir)}


def test_streamed_pretraining_killed_mid_shard_resumes_exactly(toy, sharded_cache, tmp_path):
    reference = tmp_path / "reference"
    run_script(pretrain_args(toy, sharded_cache, reference), launcher=deepspeed_launcher())
    history = log_history(reference)
    assert [entry["step"] for entry in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["loss"] < history[0]["loss"]
    # the readers start at different phases of the task cycle: every step trains on both tasks
    assert all({"text_loss", "visual_loss/pixel"} <= set(entry) for entry in history)
    ranks = [sample_log(reference, rank) for rank in range(2)]
    shards = json.loads((sharded_cache / "cache_info.json").read_text())["shards"]
    for steps in ranks:
        assert sorted(steps) == [1, 2, 3, 4, 5, 6]
        for batches in steps.values():
            assert len(batches) == 2 and all(len(batch) == 2 for batch in batches)  # accumulation 2, batch 2
    # the ranks read disjoint shards: no record id (copy included) is trained on by both ranks
    seen = [{i for batches in steps.values() for batch in batches for i in batch} for steps in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # the step-3 checkpoint holds each rank's stream position, in the middle of a shard
    for rank in range(2):
        state = torch.load(reference / "checkpoint-3" / "data_state" / f"rank{rank}.pt", weights_only=True)
        readers = _stream_states(state)  # one per dataloader worker
        assert sorted(r["reader"] for r in readers) == [2 * rank, 2 * rank + 1]
        for reader in readers:
            streams = reader["streams"]
            assert set(streams) == {"caption", "t2i"}
            assert any(s["records"]["offset"] % SHARD_SIZE or s["records"]["taken"] or s["emitted"]
                       for s in streams.values()), streams
    assert len(shards) == 10

    killed = tmp_path / "killed"
    args = pretrain_args(toy, sharded_cache, killed)
    launcher = deepspeed_launcher()
    kill_when_path_appears(launcher + args, killed / "checkpoint-3" / "COMPLETE", REPO, _env(), 600, 0.005)
    for buffer in shm_buffers(launcher):  # a killed rank cannot remove its all-reduce buffer
        buffer.unlink()
    proc = run_script(args, launcher=deepspeed_launcher())
    output = proc.stdout + proc.stderr
    assert f"resuming from the latest complete checkpoint {killed / 'checkpoint-3'}" in output
    assert f"data stream resumed from {killed / 'checkpoint-3' / 'data_state' / 'rank0.pt'}" in output
    assert [entry["step"] for entry in log_history(killed)] == [1, 2, 3, 4, 5, 6]
    expected, after = losses(reference), losses(killed)
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    for rank in range(2):
        assert sample_log(killed, rank) == ranks[rank]  # steps 4-6 from the resumed stream, 1-3 from before

    # each worker reads its own shards: continuing the run with other workers is refused in one line
    args[args.index("--dataloader_num_workers") + 1] = "0"
    args[args.index("--max_steps") + 1] = "8"
    with pytest.raises(AssertionError, match=r"rank0\.pt was written with --dataloader_num_workers 2, this launch "
                                             r"has 0"):
        run_script(args, launcher=deepspeed_launcher())


# ------------------------------------------------------------------------------------------------ two nodes


def _conversation_shards(root: Path) -> None:
    """8 conversation JSON Lines shards of 4 records each (questions about the toy images)."""
    from tests.entry.conftest import COLOURS

    root.mkdir(parents=True)
    names = list(COLOURS)
    for shard in range(8):
        lines = []
        for i in range(4):
            name = names[(shard + i) % 4]
            question = ["what colour is it?", "name the colour.", "which colour?", "colour?"][i]
            lines.append({"id": f"s{shard}-{i}", "image": f"{name}_{(shard + i) % 2}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": name}]})
        (root / f"part-{shard:02d}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _node_launch(toy, tiny_unimm, node: int, data: Path, out: Path, port: int) -> subprocess.Popen:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    args = [torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
            "127.0.0.1", "--master_port", str(port), "scripts/finetune.py", "--deepspeed",
            "configs/deepspeed/zero2.json", "--model_path", str(tiny_unimm),
            "--conversation_json", str(data), "--conversation_code_cache", str(toy["conversation_cache"]),
            "--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--streaming", "true",
            "--shuffle_window", "3", "--log_sample_ids", "true", "--save_on_each_node", "true",
            "--max_length", "64", "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2",
            "--logging_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "3e-3",
            "--warmup_steps", "0", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "5"]
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _two_nodes(toy, tiny_unimm, data: list[Path], outs: list[Path]) -> None:
    from unimm.testing import free_port

    port = free_port()
    procs = [_node_launch(toy, tiny_unimm, node, data[node], outs[node], port) for node in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    failed = [f"node {node} ({proc.returncode}):\n{log[-4000:]}" for node, (proc, log) in enumerate(zip(procs, logs))
              if proc.returncode != 0]
    assert not failed, "\n".join(failed)


def test_streamed_finetuning_on_two_nodes_without_a_shared_filesystem(toy, tiny_unimm, tmp_path):
    shards = tmp_path / "all_shards"
    _conversation_shards(shards)
    data = []
    for node in range(2):  # one reader per node: node r holds shards r, r + 2, r + 4, r + 6 only
        folder = tmp_path / f"node{node}" / "data"
        folder.mkdir(parents=True)
        for shard in range(node, 8, 2):
            shutil.copy2(shards / f"part-{shard:02d}.jsonl", folder)
        data.append(folder)
    outs = [tmp_path / f"node{node}" / "run" for node in range(2)]
    _two_nodes(toy, tiny_unimm, data, outs)

    history = log_history(outs[0])
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    logs = [sample_log(outs[node], node) for node in range(2)]
    for node in range(2):  # each node trained on its own shards' records
        ids = {i for batches in logs[node].values() for batch in batches for i in batch}
        assert ids and {int(i[1]) % 2 for i in ids} == {node}, ids
        checkpoint = outs[node] / "checkpoint-2"  # each node holds its own complete copy of every checkpoint
        assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "trainer_state.json").is_file()
        assert (checkpoint / "data_state" / f"rank{node}.pt").is_file()

    resumed = [tmp_path / f"node{node}" / "resumed" for node in range(2)]
    for node in range(2):
        resumed[node].mkdir()
        shutil.copytree(outs[node] / "checkpoint-2", resumed[node] / "checkpoint-2")
    _two_nodes(toy, tiny_unimm, data, resumed)
    expected, after = losses(outs[0]), losses(resumed[0])
    for step in (3, 4):
        assert after[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    for node in range(2):
        after_log = sample_log(resumed[node], node)
        assert sorted(after_log) == [3, 4]
        assert after_log == {step: logs[node][step] for step in (3, 4)}


def test_streamed_finetuning_under_deepspeed_with_dataloader_workers(toy, tiny_unimm, tmp_path):
    """`deepspeed --num_gpus 2 scripts/finetune.py --streaming true` with two dataloader workers per rank: four
    readers, each reading its own two of the eight conversation shards (rank r, worker w: shards 2r + w and
    2r + w + 4), every device batch from one worker."""
    shards = tmp_path / "conversations"
    _conversation_shards(shards)
    out = tmp_path / "run"
    run_script(["scripts/finetune.py", "--deepspeed", "configs/deepspeed/zero2.json", "--model_path", str(tiny_unimm),
                "--conversation_json", str(shards), "--conversation_code_cache", str(toy["conversation_cache"]),
                "--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--streaming", "true",
                "--log_sample_ids", "true", "--max_length", "64", "--output_dir", str(out), "--max_steps", "4",
                "--save_strategy", "no", "--logging_steps", "1", "--per_device_train_batch_size", "2",
                "--learning_rate", "3e-3", "--warmup_steps", "0", "--report_to", "none",
                "--dataloader_num_workers", "2", "--seed", "5"], launcher=deepspeed_launcher())
    history = log_history(out)
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    for rank in range(2):
        batches = [batch for step in sample_log(out, rank).values() for batch in step]
        assert len(batches) == 4
        for batch in batches:  # one worker's batch: one reader's shards
            readers = {int(i[1]) % 4 for i in batch}
            assert len(readers) == 1 and readers <= {2 * rank, 2 * rank + 1}, batch
        # the workers take turns: both of this rank's readers contributed
        assert {int(batch[0][1]) % 4 for batch in batches} == {2 * rank, 2 * rank + 1}


def test_streamed_pretraining_encodes_webdataset_shards_on_the_fly(toy, tmp_path):
    """No code cache: `--image_shards` names webdataset tars (a brace range), encoded by a CPU copy of the visual
    tokenizer in two dataloader workers (one tar each); every sample trained on is one of the tars' records."""
    import tarfile

    pngs = sorted(toy["images"].glob("*.png"))
    keys = []
    for shard in range(2):
        with tarfile.open(tmp_path / f"pairs-{shard:05d}.tar", "w") as tar:
            for png in pngs[shard::2]:
                key = f"{png.stem}-s{shard}"
                keys.append(key)
                tar.add(png, arcname=f"{key}.png")
                tar.add(png.with_suffix(".txt"), arcname=f"{key}.txt")
    output_dir = tmp_path / "run"
    run_script([
        "scripts/pretrain.py", "--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]),
        "--streaming", "true", "--image_shards", str(tmp_path / "pairs-{00000..00001}.tar"), "--encode_batch_size", "2",
        "--shuffle_window", "2", "--log_sample_ids", "true", "--depth_head_layers", "1", "--max_length", "64",
        "--output_dir", str(output_dir), "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--report_to", "none",
        "--dataloader_num_workers", "2", "--seed", "7", "--use_cpu", "true",
    ])
    history = log_history(output_dir)
    assert [entry["step"] for entry in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)
    trained = {i for batches in sample_log(output_dir, 0).values() for batch in batches for i in batch}
    assert trained and trained <= set(keys)
