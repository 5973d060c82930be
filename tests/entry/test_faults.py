"""Runs you can trust (issue 24): faults and bad inputs through the real programs, each ending GOOD — a one-line
error (exit status 2, no traceback) naming the file, key, option or record, with nothing run or lost — or a correct
recovery.

Genuine checkpoints are written once per module and reused: a LoRA finetune (the Hugging Face `Trainer`'s files:
`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `training_args.bin`), DeepSpeed engines of ZeRO stages 1-3 in float32
and bf16 (`tests/train/deepspeed_checkpoints.py`) and the tokenizer trainer (accelerate's files). A malicious pickle
(its payload creates a marker file) put in place of each file a resume reads is refused by the verifier, naming the
file, and the marker never appears; one relaunch of a real program shows the same end to end.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.entry.conftest import REPO, deepspeed_launcher
from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------------- helpers


class Payload:
    """Unpickling this runs `touch marker` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(file: Path, marker: Path) -> None:
    """Replace `file` by a malicious pickle in torch's format, as `torch.save` writes it."""
    torch.save({"state": Payload(marker), "weights": torch.zeros(2)}, file)


def one_error_line(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def user_error(main, argv: list[str], capsys, *fragments: str) -> str:
    """Run a program's `main(argv)` in this process: exit status 2 and one error line holding `fragments`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err, *fragments)


def run_program(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("UNIMM_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------- genuine checkpoints


def finetune_argv(toy, base, output_dir, max_steps: int = 2) -> list[str]:
    return [
        "--model_path", str(base), "--visual_tokenizer_path", str(toy["tokenizer"]),
        "--conversation_json", str(toy["conversations"]), "--conversation_code_cache", str(toy["conversation_cache"]),
        "--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--max_length", "64",
        "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0", "--output_dir", str(output_dir),
        "--max_steps", str(max_steps), "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size",
        "4", "--learning_rate", "3e-3", "--warmup_steps", "0", "--report_to", "none", "--seed", "3",
        "--use_cpu", "true",
    ]


@pytest.fixture(scope="module")
def lora_run(toy, tiny_unimm, tmp_path_factory) -> Path:
    from unimm.cli import finetune

    out = tmp_path_factory.mktemp("faults_lora")
    finetune.main(finetune_argv(toy, tiny_unimm, out))
    return out


@pytest.fixture(scope="module")
def deepspeed_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults_deepspeed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    build_deepspeed_comm_op(env)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "train" / "deepspeed_checkpoints.py"), str(out),
                           str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


TOKENIZER_FLAGS = ["--progress_bar", "false", "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size",
                   "4", "--eval_steps", "0", "--sample_steps", "0", "--image_size", "16", "--model_overrides",
                   '{"image_size": 16}', "--gan_weight", "0.1", "--gan_start_step", "1", "--disc_base_channels",
                   "8", "--disc_num_layers", "2"]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    from unimm.cli import train_tokenizer

    out = tmp_path_factory.mktemp("faults_tokenizer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_tokenizer.main([str(REPO / "configs" / "tokenizer" / "vqrae-tiny.yaml"), *TOKENIZER_FLAGS,
                              "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def genuine(kind: str, request) -> Path:
    if kind == "trainer":
        return request.getfixturevalue("lora_run") / "checkpoint-2"
    if kind == "tokenizer":
        return request.getfixturevalue("tokenizer_run") / "checkpoint-2"
    return request.getfixturevalue("deepspeed_checkpoints") / kind


# ------------------------------------------------------------------------------------ 1. no pickle runs on resume

GENUINE_KINDS = ["trainer", "tokenizer", "zero1_fp32", "zero1_bf16", "zero2_fp32", "zero2_bf16", "zero3_fp32",
                 "zero3_bf16"]


@pytest.mark.parametrize("kind", GENUINE_KINDS)
def test_genuine_checkpoints_pass_the_verifier(kind, request):
    from unimm.train.checkpoint import PICKLE_SUFFIXES, verify_checkpoint_files

    folder = genuine(kind, request)
    checked = [f for f in folder.rglob("*") if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin"]
    assert checked  # the kind really has pickle-based files, all of which pass
    assert verify_checkpoint_files(folder) == folder


# (kind, the file a resume reads): each replaced by a malicious pickle is refused by name, its payload never run.
MALICIOUS_FILES = [
    ("zero2_fp32", "global_step1/mp_rank_00_model_states.pt"),
    ("zero2_fp32", "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero2_bf16", "global_step1/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3_fp32", "global_step1/zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("zero3_fp32", "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("trainer", "rng_state.pth"),
    ("trainer", "scheduler.pt"),
    ("trainer", "optimizer.pt"),
    ("tokenizer", "random_states_0.pkl"),
    ("tokenizer", "optimizer.bin"),
    ("tokenizer", "scheduler_1.bin"),
]


@pytest.mark.parametrize(("kind", "name"), MALICIOUS_FILES)
def test_malicious_checkpoint_file_is_refused_unrun(kind, name, request, tmp_path):
    from unimm.train.checkpoint import UnsafeCheckpointError, verify_checkpoint_files

    folder = tmp_path / "checkpoint"
    shutil.copytree(genuine(kind, request), folder)
    marker = tmp_path / "payload_ran"
    plant(folder / name, marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        verify_checkpoint_files(folder)
    assert str(folder / name) in str(refused.value) and "posix.system" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_a_plain_pickle_and_a_torn_file_are_refused(lora_run, tmp_path):
    import pickle

    from unimm.train.checkpoint import UnsafeCheckpointError, verify_checkpoint_files

    folder = tmp_path / "checkpoint"
    shutil.copytree(lora_run / "checkpoint-2", folder)
    marker = tmp_path / "payload_ran"
    (folder / "scheduler.pt").write_bytes(pickle.dumps(Payload(marker)))  # pickle's own format, not torch's zip
    with pytest.raises(UnsafeCheckpointError, match="scheduler.pt: refused"):
        verify_checkpoint_files(folder)
    shutil.copy2(lora_run / "checkpoint-2" / "scheduler.pt", folder / "scheduler.pt")
    optimizer = folder / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.raises(UnsafeCheckpointError, match="optimizer.pt: damaged checkpoint file"):
        verify_checkpoint_files(folder)
    assert not marker.exists()


def test_relaunch_refuses_a_planted_deepspeed_file_and_never_reads_training_args(lora_run, deepspeed_checkpoints,
                                                                                 toy, tmp_path):
    """The issue's attack end to end: the newest complete checkpoint of a run folder holds DeepSpeed engine state
    whose `mp_rank_00_model_states.pt` is malicious (DeepSpeed itself unpickles it with `weights_only=False`);
    relaunching pretraining under the `deepspeed` launcher (auto-resume is on by default) stops with one line naming
    the file before anything is built, and the payload never runs. `training_args.bin` is never unpickled: a
    malicious one there is not even read."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    shutil.copytree(lora_run / "checkpoint-2", checkpoint)
    shutil.copytree(deepspeed_checkpoints / "zero2_fp32" / "global_step1", checkpoint / "global_step2")
    (checkpoint / "latest").write_text("global_step2")  # DeepSpeed's tag file, as its save writes it
    marker = tmp_path / "payload_ran"
    plant(checkpoint / "global_step2" / "mp_rank_00_model_states.pt", marker)
    plant(checkpoint / "training_args.bin", marker)
    args = ["scripts/pretrain.py", "--deepspeed", "configs/deepspeed/zero2.json", "--llm_path", str(toy["llm"]),
            "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache", str(toy["cache"]),
            "--depth_head_layers", "1", "--max_length", "64", "--num_samples", "8", "--output_dir", str(run),
            "--max_steps", "4", "--save_steps", "2", "--report_to", "none", "--dataloader_num_workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("UNIMM_DEBUG", None)
    proc = run_process_group(deepspeed_launcher(1) + args, timeout=300, cwd=REPO, env=env)
    assert proc.returncode != 0, proc.stdout[-3000:]
    output = proc.stdout + proc.stderr
    assert not marker.exists()
    line = one_error_line(output, str(checkpoint / "global_step2" / "mp_rank_00_model_states.pt"), "refused")
    assert "posix.system" in line
    assert not (run / "resolved_config.yaml").exists()  # stopped before the run's record was touched


def test_tokenizer_resume_without_rng_states_stops_in_one_line(tokenizer_run, tmp_path, capsys):
    from unimm.cli import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(tokenizer_run / "checkpoint-2", run / "checkpoint-2")
    (run / "checkpoint-2" / "random_states_0.pkl").unlink()
    user_error(train_tokenizer.main, [str(REPO / "configs" / "tokenizer" / "vqrae-tiny.yaml"), *TOKENIZER_FLAGS,
                                      "--max_steps", "4", "--output_dir", str(run), "--auto_resume", "true"],
               capsys, "random_states_0.pkl", "no RNG states")


# --------------------------------------------------------------------------- 5. model folders checked before use


def _damaged_copy(tiny_unimm: Path, folder: Path, config_edit=None, truncate: bool = False) -> Path:
    shutil.copytree(tiny_unimm, folder)
    if config_edit is not None:
        config = json.loads((folder / "config.json").read_text())
        config_edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if truncate:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


MODEL_FOLDER_FAULTS = {
    "no_text_config": (dict(config_edit=lambda c: c.pop("text_config")), ["config.json", "lacks text_config"]),
    "no_depth_head_layers": (dict(config_edit=lambda c: c.pop("depth_head_layers")),
                             ["config.json", "lacks depth_head_layers"]),
    "heads_deeper_than_weights": (dict(config_edit=lambda c: c.update(depth_head_layers=3)),
                                  ["the weights lack", "depth_heads.pixel.blocks.1"]),
    "truncated_weights": (dict(truncate=True), ["model.safetensors: damaged weights file"]),
}


@pytest.mark.parametrize("fault", sorted(MODEL_FOLDER_FAULTS))
def test_damaged_model_folder_is_named(fault, tiny_unimm, toy, tmp_path, capsys):
    from unimm.cli import generate_t2i

    damage, fragments = MODEL_FOLDER_FAULTS[fault]
    model = _damaged_copy(tiny_unimm, tmp_path / "model", **damage)
    out = tmp_path / "images"
    user_error(generate_t2i.main, ["--model_path", str(model), "--visual_tokenizer_path", str(toy["tokenizer"]),
                                   "--prompts", "a red image", "--output_dir", str(out)], capsys, *fragments)
    assert not out.exists()


# ------------------------------------------------------------------------------ 6. inputs validated where they enter

SAMPLING_FAULTS = {
    "top_k_negative": (["--top_k", "-5"], "top_k must be >= 0"),
    "top_p_zero": (["--top_p", "0"], "top_p must be in (0, 1]"),
    "top_p_above_one": (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    "cfg_scale_negative": (["--cfg_scale", "-2"], "cfg_scale must be >= 0"),
    "temperature_negative": (["--temperature", "-1"], "temperature must be >= 0"),
    "empty_prompt": (["--prompts", ""], "prompts[0] is empty"),
}


@pytest.mark.parametrize("fault", sorted(SAMPLING_FAULTS))
def test_bad_sampling_option_is_named(fault, tiny_unimm, toy, tmp_path, capsys):
    from unimm.cli import generate_t2i

    flags, fragment = SAMPLING_FAULTS[fault]
    argv = ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--output_dir",
            str(tmp_path / "out")]
    argv += flags if "--prompts" in flags else ["--prompts", "a red image", *flags]
    user_error(generate_t2i.main, argv, capsys, fragment)
    assert not (tmp_path / "out").exists()


def test_prompt_longer_than_the_model_is_refused(tiny_unimm, toy, tmp_path, capsys):
    from unimm.cli import generate_t2i

    limit = json.loads((tiny_unimm / "config.json").read_text())["text_config"]["max_position_embeddings"]
    user_error(generate_t2i.main, ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]),
                                   "--prompts", "red " * (limit + 10), "--output_dir", str(tmp_path / "out")],
               capsys, "prompts[0] has", f"model's {limit} positions")


def test_chat_options_and_questions_are_checked(tiny_unimm, toy, capsys):
    from unimm.cli import chat

    common = ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"])]
    user_error(chat.main, [*common, "--questions", "what?", "--do_sample", "true", "--temperature", "0"], capsys,
               "temperature must be > 0 when sampling")
    user_error(chat.main, [*common, "--questions", "what?", "--top_p", "2"], capsys, "top_p must be in (0, 1]")
    user_error(chat.main, [*common, "--questions", " "], capsys, "questions[0] is empty")


def test_exif_orientation_is_applied(tmp_path):
    from unimm.data.images import load_image

    pixels = np.zeros((10, 30, 3), dtype=np.uint8)  # stored 30 wide, 10 high, red on the left
    pixels[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", what phones write for portrait photos
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "phone.jpg", "phone")
    assert image.size == (10, 30)  # upright: 10 wide, 30 high
    top = np.asarray(image)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the stored left edge is now the top


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I;16", [0, 32896, 65535], [0, 128, 255]),  # 16-bit PNG: by 65535 / 255, not clipped at 255
    ("I", [0, 1000, 4000], [0, 4, 16]),  # 16-bit data as PIL's 32-bit mode
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # float in [0, 1]
    ("F", [-1.0, 0.0, 1.0], [0, 128, 255]),  # any other float range: from its minimum to its maximum
])
def test_high_bit_depth_images_are_scaled_not_clipped(mode, values, expected, tmp_path):
    from unimm.data.images import load_image

    array = np.array([values], dtype=np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
    source = Image.fromarray(array)
    assert source.mode == mode
    if mode == "I;16":  # through a real 16-bit PNG file
        source.save(tmp_path / "deep.png")
        source = tmp_path / "deep.png"
    image = load_image(source, "deep")
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == expected


def test_empty_answer_is_a_counted_bad_record(tiny_unimm):
    from transformers import AutoTokenizer

    from unimm.data.bad_samples import BadSampleTracker
    from unimm.data.sources import normalise_llava_record
    from unimm.data.tasks import SampleConfig, SampleFactory, conversation_dataset
    from unimm.llm.layout import VocabLayout

    tokenizer = AutoTokenizer.from_pretrained(tiny_unimm)
    layout = VocabLayout.from_dict(json.loads((tiny_unimm / "config.json").read_text())["vocab_layout"])
    records = [normalise_llava_record({"id": f"r{i}", "conversations": [
        {"from": "human", "value": "what colour?"}, {"from": "gpt", "value": answer}]}, i, "x")
        for i, answer in enumerate(["red", "  ", "blue"])]
    tracker = BadSampleTracker(max_bad_fraction=0.5, name="conversation data")
    dataset = conversation_dataset(records, SampleFactory(tokenizer, layout, SampleConfig(max_length=64)), None,
                                   tracker)
    built = [dataset[i].sample_id for i in range(3)]
    assert built == ["r0", "r2", "r2"]  # the empty answer was replaced by the next record
    assert tracker.num_bad == 1 and "r1" in str(tracker.bad_examples) and "empty answer" in str(tracker.bad_examples)


def test_merge_lora_checks_the_base(lora_run, tiny_unimm, toy, tmp_path, capsys):
    from transformers import AutoTokenizer

    from unimm.cli import merge_lora
    from unimm.testing import build_tiny_llm
    from unimm.train.args import ModelArguments, VisualModulesConfig
    from unimm.train.llm.build import build_model

    adapter = lora_run / "checkpoint-2"
    # the same architecture with other weights: another base of the same size
    other = tmp_path / "other_base"
    built = build_model(ModelArguments(llm_path=str(toy["llm"]), visual_tokenizer_path=str(toy["tokenizer"])),
                        VisualModulesConfig(depth_head_layers=1), seed=123)
    built.model.save_pretrained(other)
    built.text_tokenizer.save_pretrained(other)
    user_error(merge_lora.main, ["--adapter_path", str(adapter), "--output_dir", str(tmp_path / "m1"),
                                 "--base_model_path", str(other)], capsys, f"base_model_path={other}",
               str(tiny_unimm), "weights differ")
    # a base of another size
    bigger_llm = build_tiny_llm(tmp_path / "bigger_llm", "qwen2", AutoTokenizer.from_pretrained(toy["llm"]),
                                hidden_size=96)
    bigger = tmp_path / "bigger_base"
    built = build_model(ModelArguments(llm_path=str(bigger_llm), visual_tokenizer_path=str(toy["tokenizer"])),
                        VisualModulesConfig(depth_head_layers=1))
    built.model.save_pretrained(bigger)
    built.text_tokenizer.save_pretrained(bigger)
    user_error(merge_lora.main, ["--adapter_path", str(adapter), "--output_dir", str(tmp_path / "m2"),
                                 "--base_model_path", str(bigger)], capsys, f"base_model_path={bigger}", "shape")
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    # a copy of the recorded base is the same model: merged
    copy = tmp_path / "copy_of_base"
    shutil.copytree(tiny_unimm, copy)
    merge_lora.main(["--adapter_path", str(adapter), "--output_dir", str(tmp_path / "m3"), "--base_model_path",
                     str(copy)])
    assert (tmp_path / "m3" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- 7. every user error is one line


def test_non_utf8_byte_in_llava_json_is_named(toy, tiny_unimm, tmp_path, capsys):
    from unimm.cli import finetune

    bad = tmp_path / "conversations.json"
    text = toy["conversations"].read_bytes()
    position = text.index(b"what colour")
    bad.write_bytes(text[:position] + b"\xff" + text[position:])
    argv = finetune_argv(toy, tiny_unimm, tmp_path / "run")
    argv[argv.index("--conversation_json") + 1] = str(bad)
    user_error(finetune.main, argv, capsys, f"{bad}:1:", "not UTF-8 (byte 0xff)")


def test_non_utf8_byte_in_jsonl_is_a_bad_record_and_in_text_data_is_named(tmp_path):
    from unimm.data.sources import read_llava_json, read_text_records
    from unimm.utils.errors import InputFileError

    jsonl = tmp_path / "conversations.jsonl"
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    jsonl.write_bytes(json.dumps(good).encode() + b'\n{"id": "b\xff"}\n')
    assert read_llava_json(jsonl)["malformed"] == [None, f"{jsonl}:2:10: not UTF-8 (byte 0xff)"]
    text = tmp_path / "text.txt"
    text.write_bytes(b"hello\nwor\xffld\n")
    with pytest.raises(InputFileError, match=f"{text}:2:4: not UTF-8"):
        read_text_records(text)


def test_finetune_without_code_cache_for_caption_weight(toy, tiny_unimm, tmp_path, capsys):
    from unimm.cli import finetune

    argv = finetune_argv(toy, tiny_unimm, tmp_path / "run")
    argv[argv.index("--caption_weight") + 1] = "1"
    user_error(finetune.main, argv, capsys, "caption_weight/t2i_weight > 0 need code_cache")


def test_visual_tokenizer_mismatch_is_one_line(tiny_unimm, toy, tmp_path, capsys):
    from unimm.cli import generate_t2i
    from unimm.tokenizer import load_tokenizer

    other = tmp_path / "other_tokenizer"  # the same architecture with other weights (e.g. another training stage)
    tokenizer = load_tokenizer(toy["tokenizer"])
    with torch.no_grad():
        next(tokenizer.parameters()).add_(0.01)
    tokenizer.save_pretrained(other)
    user_error(generate_t2i.main, ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(other),
                                   "--prompts", "a red image", "--output_dir", str(tmp_path / "out")], capsys,
               "visual tokenizer mismatch", str(other))


def test_inspect_data_record_whose_image_is_a_folder(tiny_unimm, toy, tmp_path, capsys):
    from unimm.cli import inspect_data

    records = json.loads(toy["conversations"].read_text())
    records[0]["image"] = "."  # the images folder itself
    data = toy["images"] / "folder_image.json"
    data.write_text(json.dumps(records[:2]))
    try:
        capsys.readouterr()
        inspect_data.main(["--model", str(tiny_unimm), "--data", str(data), "--code_cache",
                           str(toy["conversation_cache"]), "--num_samples", "2"])
    finally:
        data.unlink()
    out = capsys.readouterr().out
    assert f"sample {records[0]['id']}: SKIPPED" in out  # the bad record is named, the good one shown
    assert f"=== sample {records[1]['id']} (conversation)" in out


def test_disk_full_inside_torch_save_names_the_file(tmp_path, capsys):
    """ENOSPC from the file `torch.save` writes (simulated by a file object whose writes fail as a full disk's do),
    and from `Path.write_text`: one line saying no space is left, with the path."""
    from unimm.cli.errors import run_main

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "checkpoint-9" / "optimizer.pt"
    target.parent.mkdir()

    def save(argv):
        with FullDisk(target, "w") as f:
            torch.save({"exp_avg": torch.zeros(1000)}, f)

    with pytest.raises(SystemExit) as exit_:
        run_main(save, [], prog="pretrain.py")
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr().err, "no space left on device", str(target))


def test_disk_full_on_a_real_tmpfs(tmp_path, capsys):
    """The real thing where this user may mount a 64 KiB tmpfs: torch's own writer error (no path, no cause) and
    safetensors' both become one line naming the file."""
    from safetensors.torch import save_file

    from unimm.cli.errors import run_main

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to build a full disk")
    try:
        for name, write in (("state.pt", lambda p: torch.save({"a": torch.zeros(100_000)}, p)),
                            ("model.safetensors", lambda p: save_file({"a": torch.zeros(100_000)}, str(p)))):
            with pytest.raises(SystemExit) as exit_:
                run_main(lambda argv, name=name, write=write: write(disk / name), [], prog="pretrain.py")
            assert exit_.value.code == 2
            one_error_line(capsys.readouterr().err, "no space left on device", str(disk / name))
            for file in disk.iterdir():
                file.unlink()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_deepspeed_world_size_change_is_one_line(deepspeed_checkpoints):
    result = json.loads((deepspeed_checkpoints / "world_size_error.json").read_text())
    assert result["raised"] == "ZeRORuntimeException" and result["user_error"]
    line = result["line"]
    assert "\n" not in line and str(deepspeed_checkpoints / "world_size") in line
    assert "world size of 2" in line and "current world size is 1" in line
