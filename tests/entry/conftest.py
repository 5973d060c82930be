"""Fixtures of the entry-point tests: a learnable toy built offline in a few seconds.

- a tiny DualToken tokenizer (random SigLIP-shaped encoder, 16 px, 4x4 = 16 positions, 2 groups of depth 2);
- solid-colour images with captions ("a red image" ...), pretokenized into a code cache: each colour maps to
  one fixed code pattern, so caption and text-to-image losses fall quickly;
- a tiny random Qwen2 (+ Qwen-style BPE tokenizer) from the root conftest;
- a LLaVA JSON of questions about the same images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
IMAGE_SIZE = 16


@pytest.fixture(scope="session")
def toy(tmp_path_factory, tiny_qwen2_path) -> dict[str, Path]:
    from PIL import Image

    from unimm.data.code_cache import finalize_code_cache, llava_image_records, pretokenize
    from unimm.data.images import read_image_records
    from unimm.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("entry_toy")
    images = root / "images"
    images.mkdir()
    conversations = []
    for name, rgb in COLOURS.items():
        for copy in range(2):
            stem = f"{name}_{copy}"
            Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rgb).save(images / f"{stem}.png")
            (images / f"{stem}.txt").write_text(f"a {name} image")
            conversations.append({"id": stem, "image": f"{stem}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": name}]})
    (images / "conversations.json").write_text(json.dumps(conversations))
    tokenizer = build_tokenizer("dualtoken-tiny", image_size=IMAGE_SIZE, patch_size=4, encoder_hidden_size=32,
                                pixel_num_codes=64, semantic_num_codes=64)
    tokenizer_path = root / "visual_tokenizer"
    tokenizer.save_pretrained(tokenizer_path)
    cache = root / "code_cache"
    pretokenize(read_image_records(images), tokenizer, cache, batch_size=8, show_progress=False)
    finalize_code_cache(cache, tokenizer)
    conversation_cache = root / "conversation_cache"  # keyed by the image paths written in the LLaVA file
    pretokenize(llava_image_records(images / "conversations.json"), tokenizer, conversation_cache, batch_size=8,
                show_progress=False)
    finalize_code_cache(conversation_cache, tokenizer)
    return {"root": root, "llm": Path(tiny_qwen2_path), "tokenizer": tokenizer_path, "cache": cache,
            "conversations": images / "conversations.json", "conversation_cache": conversation_cache,
            "images": images}


def run_script(args: list[str], launcher: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point as users do (a fresh interpreter, or under the `deepspeed` launcher); raise with its
    output on failure. The run's whole process group is killed when it ends or times out."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    command = (launcher or [sys.executable]) + args
    proc = run_process_group(command, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def deepspeed_launcher(num_procs: int = 2, master_port: int | None = None) -> list[str]:
    """The `deepspeed` launcher on a free master port (fixed ports collide when several test runs share a host),
    with DeepSpeed's CPU op built beforehand."""
    build_deepspeed_comm_op()
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_procs), "--master_port",
            str(master_port or free_port())]


def torchrun_launcher(num_procs: int = 2, master_port: int | None = None) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(num_procs), "--master_port",
            str(master_port or free_port())]


def log_history(output_dir: Path) -> list[dict]:
    """Per-step training logs of a finished run (trainer_state.json in output_dir)."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="session")
def vqrae_toy(toy, tmp_path_factory) -> dict:
    """The toy images and conversations, with a tiny VQRAE tokenizer and its code cache."""
    from unimm.data.code_cache import finalize_code_cache, llava_image_records, pretokenize
    from unimm.data.images import read_image_records
    from unimm.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("vqrae_toy")
    tokenizer = build_tokenizer("vqrae-tiny", image_size=16, patch_size=4, encoder_hidden_size=32, num_codes=64)
    tokenizer.save_pretrained(root / "visual_tokenizer")
    pretokenize(read_image_records(toy["images"]), tokenizer, root / "code_cache", batch_size=8, show_progress=False)
    finalize_code_cache(root / "code_cache", tokenizer)
    pretokenize(llava_image_records(toy["conversations"]), tokenizer, root / "conversation_cache", batch_size=8,
                show_progress=False)
    finalize_code_cache(root / "conversation_cache", tokenizer)
    return {**toy, "tokenizer": root / "visual_tokenizer", "cache": root / "code_cache",
            "conversation_cache": root / "conversation_cache"}


@pytest.fixture(scope="session")
def tiny_unimm(toy, tmp_path_factory) -> Path:
    """An untrained UniMM model (tiny Qwen2 + the toy tokenizer's codebooks, one depth-head layer) saved to disk."""
    from unimm.train.args import ModelArguments, VisualModulesConfig
    from unimm.train.llm.build import build_model

    path = tmp_path_factory.mktemp("tiny_unimm")
    built = build_model(ModelArguments(llm_path=str(toy["llm"]), visual_tokenizer_path=str(toy["tokenizer"])),
                        VisualModulesConfig(depth_head_layers=1))
    built.model.save_pretrained(path)
    built.text_tokenizer.save_pretrained(path)
    return path
