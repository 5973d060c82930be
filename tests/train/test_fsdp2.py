"""FSDP2 as the second training engine: `torchrun --nproc_per_node 2 scripts/pretrain.py --fsdp --fsdp_config
configs/fsdp/fsdp2.json` on two gloo CPU ranks, against the same program under plain DDP.

The pretraining runs are those of `tests/entry/test_pretrain_deepspeed.py` (tiny Qwen2 + toy code cache, packed rows,
gradient accumulation 2, checkpoints at steps 2 and 4), where DDP, ZeRO-2 and ZeRO-3 already agree; here FSDP2 must
log DDP's losses, write sharded checkpoints, resume after a kill -9 with the uninterrupted run's losses, gather its
final weights into an HF folder that loads in one process, and finetune with LoRA (the same losses and adapter as
DDP). The README's FSDP2 launch line runs, shrunk, under bf16 mixed precision.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO, log_history, run_script, torchrun_launcher
from tests.entry.conftest import tiny_unimm as tiny_unimm  # noqa: F401 - fixtures shared with the entry tests
from tests.entry.conftest import toy as toy  # noqa: F401
from tests.entry.conftest import vqrae_toy as vqrae_toy  # noqa: F401
from tests.entry.test_pretrain_deepspeed import STEPS, losses, pretrain_args
from tests.entry.test_recipes import RECIPES, _argv, _without
from tests.entry.test_recipes import family_llms as family_llms  # noqa: F401
from unimm.testing import kill_when_path_appears

pytestmark = pytest.mark.slow

FSDP = ["--fsdp", "--fsdp_config", "configs/fsdp/fsdp2.json"]


def ddp_args(toy, output_dir) -> list[str]:
    args = pretrain_args(toy, output_dir, "zero2")
    del args[1:3]  # no --deepspeed: DDP under torchrun
    return args


def fsdp_args(toy, output_dir) -> list[str]:
    return ddp_args(toy, output_dir) + FSDP


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[step] - b[step]) for step in a)


@pytest.fixture(scope="module")
def ddp_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_ddp")
    run_script(ddp_args(toy, out), launcher=torchrun_launcher())
    return out


@pytest.fixture(scope="module")
def fsdp_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_fsdp2")
    run_script(fsdp_args(toy, out), launcher=torchrun_launcher())
    return out


def test_fsdp2_logs_the_ddp_losses_and_writes_sharded_checkpoints(ddp_run, fsdp_run):
    reference, fsdp = losses(ddp_run), losses(fsdp_run)
    assert sorted(fsdp) == sorted(reference) == list(range(1, STEPS + 1))
    print(f"FSDP2 vs DDP, max |loss diff| per step: {max_diff(reference, fsdp):.3g} ({reference} / {fsdp})")
    for step in reference:  # measured: equal to 5e-7 (float32 reduction order)
        assert fsdp[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    assert fsdp[STEPS] < fsdp[1]
    for step in (2, 4):
        checkpoint = fsdp_run / f"checkpoint-{step}"
        assert (checkpoint / "COMPLETE").is_file()
        # torch distributed checkpoints: each rank wrote its shard of the model and of the optimizer state
        assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
        assert (checkpoint / "optimizer_0" / ".metadata").is_file()
        assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    # beside the shards, the gathered model: the checkpoint loads in one process, as a DDP checkpoint does
    assert_close_models(fsdp_run / "checkpoint-2", ddp_run / "checkpoint-2")


def test_fsdp2_final_model_is_an_hf_folder_equal_to_ddp(ddp_run, fsdp_run):
    assert (fsdp_run / "tokenizer_config.json").is_file()
    assert_close_models(fsdp_run, ddp_run)


def assert_close_models(fsdp_folder: Path, ddp_folder: Path) -> None:
    from unimm.llm import UniMMForCausalLM

    fsdp_model = UniMMForCausalLM.from_pretrained(fsdp_folder)  # one process, no process group
    ddp_model = UniMMForCausalLM.from_pretrained(ddp_folder)
    assert fsdp_model.config.layout == ddp_model.config.layout
    ddp_params = dict(ddp_model.named_parameters())
    for name, param in fsdp_model.named_parameters():
        assert param.dtype == torch.float32 and param.shape == ddp_params[name].shape, name
        # Adam moves an element by about the learning rate whatever its gradient's size, so where a gradient is
        # near zero the engines' reduction orders may flip a step's sign; every other element agrees to noise.
        diff = (param - ddp_params[name]).abs()
        assert diff.median() < 1e-5 and (diff > 1e-3).float().mean() < 0.02, (name, diff.max())


def test_fsdp2_killed_run_resumes_with_the_uninterrupted_losses(fsdp_run, toy, tmp_path):
    """kill -9 of the launcher and both ranks the moment checkpoint-4 appears (checkpoint-2 is complete by then,
    checkpoint-4 most likely half written); the relaunch (same command) resumes from the sharded checkpoint-2 and
    logs the uninterrupted run's losses, every step once."""
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    kill_when_path_appears(torchrun_launcher() + fsdp_args(toy, run), run / "checkpoint-4", REPO, env, 600, 0.005)
    assert not (run / "trainer_state.json").exists()  # killed before the end
    assert (run / "checkpoint-2" / "COMPLETE").is_file()
    written = (run / "checkpoint-2" / "COMPLETE").stat().st_mtime_ns
    run_script(fsdp_args(toy, run), launcher=torchrun_launcher())
    # resumed from checkpoint-2 (a run from scratch would have written it again), checkpoint-4 written anew
    assert (run / "checkpoint-2" / "COMPLETE").stat().st_mtime_ns == written
    assert (run / "checkpoint-4" / "COMPLETE").is_file()
    reference, after = losses(fsdp_run), losses(run)
    assert [entry["step"] for entry in log_history(run)] == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)


def finetune_lora_args(toy, base, output_dir) -> list[str]:
    return [
        "scripts/finetune.py", "--model_path", str(base), "--visual_tokenizer_path", str(toy["tokenizer"]),
        "--conversation_json", str(toy["conversations"]), "--conversation_code_cache", str(toy["conversation_cache"]),
        "--conversation_weight", "1", "--caption_weight", "0", "--t2i_weight", "0", "--max_length", "64",
        "--use_lora", "true", "--lora_r", "4", "--lora_dropout", "0", "--output_dir", str(output_dir),
        "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--report_to", "none", "--seed", "3",
        "--dataloader_num_workers", "0", "--gradient_accumulation_steps", "2",
    ]


def test_fsdp2_lora_finetune_matches_ddp(toy, tiny_unimm, tmp_path):  # noqa: F811
    """LoRA under FSDP2 trains what it trains under DDP with --lora_embeddings full (FSDP2 shards the tables, so the
    new-rows-only default becomes whole tables, with a warning): the same losses, and the saved adapter loads on its
    base model in one process with the DDP run's weights."""
    from unimm.train.llm.lora import load_lora_model

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run_script(finetune_lora_args(toy, tiny_unimm, ddp) + ["--lora_embeddings", "full"], launcher=torchrun_launcher())
    run_script(finetune_lora_args(toy, tiny_unimm, fsdp) + FSDP, launcher=torchrun_launcher())
    adapter_config = json.loads((fsdp / "adapter_config.json").read_text())
    assert "embed_tokens" in adapter_config["modules_to_save"] and not adapter_config["trainable_token_indices"]
    reference, after = losses(ddp), losses(fsdp)
    print(f"LoRA FSDP2 vs DDP, max |loss diff| per step: {max_diff(reference, after):.3g}")
    assert sorted(after) == [1, 2, 3]
    for step in reference:
        assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    models = {}
    for name, folder in (("ddp", ddp), ("fsdp", fsdp)):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
        models[name] = load_lora_model(folder)  # on its base model (tiny_unimm), in one process
    ddp_params = dict(models["ddp"].named_parameters())
    trained = [n for n, p in models["fsdp"].named_parameters() if "lora_" in n or "modules_to_save" in n]
    assert any("lora_A" in n for n in trained) and any("embed_tokens.modules_to_save" in n for n in trained)
    for name in trained:
        assert torch.allclose(dict(models["fsdp"].named_parameters())[name], ddp_params[name], atol=1e-4), name
    # the sharded checkpoint carries the gathered adapter too, loadable (and mergeable) in one process
    checkpoint = fsdp / "checkpoint-2"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "adapter_model.safetensors").is_file()
    assert any("lora_A" in n for n, _ in load_lora_model(checkpoint).named_parameters())


def test_fsdp2_llava_full_recipe_with_vqrae_features_saves_the_projector(vqrae_toy, family_llms, tmp_path):
    """The LLaVA full-finetune recipe under FSDP2 reading images as VQRAE features (the visual tokenizer runs outside
    the engine, whole on every rank; the feature projector is sharded): it trains, and `--save_mm_projector` gathers
    the sharded projector into LLaVA's mm_projector.bin, equal to the final model's projector."""
    from unimm.llm import UniMMForCausalLM
    from unimm.llm.projector import LLAVA_PROJECTOR_FILE, load_mm_projector

    out = tmp_path / "fsdp2"
    recipe = "configs/finetune/llava_full.yaml"
    argv = _argv(recipe, RECIPES[recipe], dict(vqrae_toy), family_llms["qwen2.5-1.5b"], out)
    run_script(["scripts/finetune.py", *FSDP, *_without(argv, "--use_cpu"), "--save_mm_projector", "true",
                "--save_steps", "1"], launcher=torchrun_launcher())
    checkpoint = out / "checkpoint-1"  # sharded, with the gathered projector beside the shards
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / LLAVA_PROJECTOR_FILE).is_file()
    history = log_history(out)
    assert len(history) == 2 and all(math.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in history)
    model = UniMMForCausalLM.from_pretrained(out)
    assert model.feature_projector is not None
    trained = {k: v.clone() for k, v in model.feature_projector.state_dict().items()}
    torch.nn.init.zeros_(model.feature_projector.linear_1.weight)
    load_mm_projector(model, out / LLAVA_PROJECTOR_FILE)
    for name, value in model.feature_projector.state_dict().items():
        assert torch.equal(value, trained[name]), name


def _readme_fsdp_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        command = block.replace("\\\n", " ").strip()
        if command.startswith("torchrun") and "--fsdp" in command:
            return shlex.split(command)
    raise AssertionError("README.md shows no torchrun --fsdp launch")


def test_readme_fsdp2_launch_line_runs_with_bf16(toy, tmp_path):
    """The README's FSDP2 command, with the quickstart paths pointed at the toy, two steps and --bf16 true (with
    --use_cpu true, which transformers asks for to accept --bf16 without CUDA): the
    weights are all-gathered and used in bfloat16, while the sharded master weights, and so the saved model, stay
    float32."""
    from unimm.llm import UniMMForCausalLM

    command = _readme_fsdp_command()
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[3] == "scripts/pretrain.py"
    paths = {"runs/quickstart/llm": toy["llm"], "runs/quickstart/tokenizer/model": toy["tokenizer"],
             "runs/quickstart/code_cache": toy["cache"], "runs/pretrain_fsdp": tmp_path / "run"}
    args = [str(paths.get(arg, arg)) for arg in command[3:]]
    args[args.index("--max_steps") + 1] = "2"
    assert FSDP == args[1:4]
    run_script(args + ["--num_samples", "64", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                       "--bf16", "true", "--use_cpu", "true"], launcher=torchrun_launcher())
    history = log_history(tmp_path / "run")
    assert [entry["step"] for entry in history] == [1, 2] and all(math.isfinite(e["loss"]) for e in history)
    model = UniMMForCausalLM.from_pretrained(tmp_path / "run")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
