"""LLaVA-1.5's own launch lines train UniMM end to end: the argument lists of haotian-liu/LLaVA's
`scripts/v1_5/pretrain.sh` (stage 1: projector only, `mm_projector.bin`) and `scripts/v1_5/finetune_lora.sh`
(stage 2: LoRA from that projector), under `deepspeed --num_gpus 2`, with only these changes:

- paths: a tiny random LLaMA with a real LLaMA-kind SentencePiece tokenizer as it ships (Mistral-7B's, from the
  mistral-common wheel: 32000 pieces, no pad token, like LLaMA-2 and Vicuna), a tiny random CLIP tower, a LLaVA
  JSON over shapes images, `configs/deepspeed/zero2.json` / `zero3.json` for LLaVA's `./scripts/zero2.json` / `zero3.json`;
- sizes: `--per_device_train_batch_size 2`, `--max_steps 2` (then 4, to resume), stage 2 `--save_steps 2`;
- nothing else: without CUDA the translation adds `--use_cpu true` itself (transformers refuses `--bf16 True`
  without it; bf16 on CPU then trains as asked).

Everything else is LLaVA's, including `--report_to wandb` (dropped with a note when wandb is not installed),
`--tf32 True` (ignored without CUDA), `--dataloader_num_workers 4` and `--save_total_limit 1`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO, deepspeed_launcher, run_script

pytestmark = pytest.mark.slow

LLAVA_PROJECTOR_KEYS = {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                        "model.mm_projector.2.bias"}


@pytest.fixture(scope="module")
def llava_assets(tmp_path_factory) -> dict[str, Path]:
    from tests.conftest import wheel_asset
    from unimm.data.toy.shapes import ShapesDataset, write_llava_json
    from unimm.testing import (
        MISTRAL_COMMON_WHEEL,
        build_sentencepiece_tokenizer,
        build_tiny_llm,
        build_tiny_vision_tower,
    )

    root = tmp_path_factory.mktemp("llava_launch")
    # the LLaMA-kind SentencePiece tokenizer exactly as it ships: no pad token, like LLaMA-2 and Vicuna checkpoints
    tokenizer = build_sentencepiece_tokenizer(wheel_asset(*MISTRAL_COMMON_WHEEL), root / "tokenizer", pad_token=None)
    llm = build_tiny_llm(root / "llama-tiny", "llama", tokenizer)
    tower = build_tiny_vision_tower(root / "clip-vit-tiny", "clip")
    data = root / "playground"
    mix = write_llava_json(ShapesDataset(8, seed=0), data, "llava_v1_5_mix.json")
    # stage 1 data as LLaVA-Pretrain's blip_laion_cc_sbu_558k.json: one image and its caption per record
    captions = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": r["conversations"][-1]["value"]}]}
        for r in json.loads(mix.read_text())]
    pretrain_json = data / "blip_laion_cc_sbu.json"
    pretrain_json.write_text(json.dumps(captions))
    return {"root": root, "llm": llm, "tower": tower, "images": data, "mix": mix,
            "pretrain_json": pretrain_json}


def training_tail(output_dir: Path, save_steps: str, learning_rate: str, max_steps: int) -> list[str]:
    """The flags both scripts end with (from `--bf16 True` on), where only save_steps and learning_rate differ."""
    return [
        "--bf16", "True",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", save_steps,
        "--save_total_limit", "1",
        "--learning_rate", learning_rate,
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--tf32", "True",
        "--model_max_length", "2048",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True",
        "--report_to", "wandb",
        "--max_steps", str(max_steps),
    ]


def pretrain_sh(a: dict[str, Path], output_dir: Path) -> list[str]:
    return [
        "scripts/pretrain.py",
        "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"),
        "--model_name_or_path", str(a["llm"]),
        "--version", "plain",
        "--data_path", str(a["pretrain_json"]),
        "--image_folder", str(a["images"]),
        "--vision_tower", str(a["tower"]),
        "--mm_projector_type", "mlp2x_gelu",
        "--tune_mm_mlp_adapter", "True",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        *training_tail(output_dir, save_steps="24000", learning_rate="1e-3", max_steps=2),
    ]


def finetune_lora_sh(a: dict[str, Path], projector: Path, output_dir: Path, max_steps: int) -> list[str]:
    return [
        "scripts/finetune.py",
        "--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5",
        "--deepspeed", str(REPO / "configs/deepspeed/zero3.json"),
        "--model_name_or_path", str(a["llm"]),
        "--version", "v1",
        "--data_path", str(a["mix"]),
        "--image_folder", str(a["images"]),
        "--vision_tower", str(a["tower"]),
        "--pretrain_mm_mlp_adapter", str(projector),
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        *training_tail(output_dir, save_steps="2", learning_rate="2e-4", max_steps=max_steps),
    ]


def global_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


@pytest.fixture(scope="module")
def stage1(llava_assets):
    out = llava_assets["root"] / "llava-v1.5-pretrain"
    proc = run_script(pretrain_sh(llava_assets, out), launcher=deepspeed_launcher())
    return out, proc


def test_pretrain_sh_trains_the_projector_only_and_writes_mm_projector_bin(stage1, llava_assets):
    from safetensors.torch import load_file

    out, proc = stage1
    assert global_step(out) == 2
    state = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert set(state) == LLAVA_PROJECTOR_KEYS
    assert state["model.mm_projector.0.weight"].shape == (64, 32)  # LLM width x the tower's width
    assert set(torch.load(out / "checkpoint-2" / "mm_projector.bin", weights_only=True)) == LLAVA_PROJECTOR_KEYS
    # translated with LLaVA's meanings, and said so once (rank 0 only)
    assert proc.stderr.count("--data_path without mixture weights: training on its conversations only") == 1
    assert "--tf32: ignored" in proc.stderr
    # --tune_mm_mlp_adapter froze the LLM: its weights are the original ones (in bf16, the --bf16 load dtype)
    saved = load_file(out / "model.safetensors")
    original = load_file(llava_assets["llm"] / "model.safetensors")
    name = next(n for n in original if n.endswith("layers.0.self_attn.q_proj.weight"))
    ours = next(n for n in saved if n.endswith("layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(saved[ours], original[name].to(saved[ours].dtype), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["vision_tower"]["path"] == str(llava_assets["tower"])


def test_pretrain_sh_pads_the_shipped_tokenizer_with_unk_and_chat_answers(stage1, llava_assets, capsys):
    """The LLaMA-kind tokenizer as it ships has no pad token: the run pads with its unk token, as LLaVA does, says
    so once, adds no token for it, and saves it with the tokenizer, so the chat program answers with the result."""
    from transformers import AutoTokenizer

    from unimm.cli import chat

    out, proc = stage1
    assert AutoTokenizer.from_pretrained(llava_assets["llm"]).pad_token is None
    assert proc.stderr.count("the text tokenizer has no pad token: padding with its unk token '<unk>' (id 0), "
                             "as LLaVA does") == 1
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == saved.unk_token == "<unk>" and saved.pad_token_id == 0
    layout = json.loads((out / "config.json").read_text())["vocab_layout"]
    assert layout["original_vocab_size"] == 32000 and layout["boi_token_id"] == 32000
    image = next((llava_assets["images"] / "images").glob("*.png"))
    results = chat.main(["--model_path", str(out), "--images", str(image), "--questions", "What shape is it?",
                         "--chat_format", "llava_plain", "--max_new_tokens", "3", "--device", "cpu"])
    assert len(results) == 1 and f"Q: What shape is it?\nA: {results[0]['answer']}" in capsys.readouterr().out


def test_finetune_lora_sh_loads_the_projector_resumes_and_exports(stage1, llava_assets):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import unimm  # noqa: F401  (registers UniMM with the Auto classes)
    from unimm.cli import merge_lora

    projector = stage1[0] / "mm_projector.bin"
    out = llava_assets["root"] / "llava-v1.5-lora"
    first = run_script(finetune_lora_sh(llava_assets, projector, out, 2), launcher=deepspeed_launcher())
    assert global_step(out) == 2 and (out / "checkpoint-2" / "COMPLETE").is_file()
    assert "feature projector: 4 tensors at learning rate 2e-05" in first.stderr  # --mm_projector_lr's group
    # --pretrain_mm_mlp_adapter: the model LoRA wraps (written before training) starts from stage 1's projector
    base = load_file(out / "base_model" / "model.safetensors")
    stage1_state = torch.load(projector, weights_only=True)
    for ours, llava in (("linear_1", "0"), ("linear_2", "2")):
        for kind in ("weight", "bias"):
            assert torch.equal(base[f"feature_projector.{ours}.{kind}"].float(),
                               stage1_state[f"model.mm_projector.{llava}.{kind}"].float())

    resumed = run_script(finetune_lora_sh(llava_assets, projector, out, 4), launcher=deepspeed_launcher())
    assert f"resuming from the latest complete checkpoint {out / 'checkpoint-2'}" in resumed.stderr
    assert global_step(out) == 4 and (out / "checkpoint-4" / "COMPLETE").is_file()
    assert not (out / "checkpoint-2").exists()  # LLaVA's --save_total_limit 1
    assert "'epoch': '0.5'" not in resumed.stdout + resumed.stderr  # steps 1-2 were not trained again

    merged_dir = llava_assets["root"] / "llava-v1.5-merged"
    merge_lora.main(["--adapter_path", str(out / "checkpoint-4"), "--output_dir", str(merged_dir)])
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(model).__name__ == "UniMMForCausalLM"
    assert model.config.vision_tower["path"] == str(llava_assets["tower"])
    assert model.config.vision_tower["image_aspect_ratio"] == "pad"
    assert model.feature_projector is not None and not model.config.codebook_spec  # understanding only

    # inference rebuilds the recorded tower as the image encoder (no visual tokenizer needed)
    from PIL import Image

    from unimm.inference.args import InferenceArguments
    from unimm.inference.stack import load_inference_stack
    from unimm.llm.vision_tower import VisionTower

    stack = load_inference_stack(InferenceArguments(model_path=str(merged_dir), device="cpu", dtype="float32"))
    assert isinstance(stack.visual_tokenizer, VisionTower) and stack.visual_tokenizer.image_aspect_ratio == "pad"
    image = Image.open(next((llava_assets["images"] / "images").glob("*.png")))
    with torch.no_grad():
        features = stack.visual_tokenizer.encode_features(stack.visual_tokenizer.preprocess(image.resize((48, 32))))
        projected = stack.model.feature_projector(features.to(stack.model.dtype))
    assert projected.shape == (1, stack.visual_tokenizer.num_positions, stack.model.config.text_config.hidden_size)
