"""Fixtures of the data tests: tokenizers with UniMM's special tokens and their vocabulary layouts.

The layout comes from the real `unimm.llm.vocab.extend_tokenizer_and_model`, so the data layer is tested against
the ids training uses.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from unimm.llm.layout import VocabLayout

SEMANTIC_SPEC = {"semantic": {"num_codes": 32, "depth": 1, "code_dim": 8}}
DUAL_SPEC = {"pixel": {"num_codes": 16, "depth": 3, "code_dim": 4}, "semantic": {"num_codes": 8, "depth": 2,
                                                                                 "code_dim": 4}}


def add_layout(tokenizer, codebook_spec: dict, flat_codes: bool = False) -> VocabLayout:
    """Extend `tokenizer` with the real `extend_tokenizer_and_model` (on a throwaway one-layer LM of the same
    vocabulary) and return the layout."""
    from transformers import AutoModelForCausalLM

    from unimm.llm.vocab import extend_tokenizer_and_model
    from unimm.testing import tiny_llm_config

    config = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    return extend_tokenizer_and_model(tokenizer, AutoModelForCausalLM.from_config(config), codebook_spec, flat_codes)


@pytest.fixture
def qwen(qwen_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    return tokenizer, add_layout(tokenizer, SEMANTIC_SPEC)


@pytest.fixture
def llama(llama_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_path)
    return tokenizer, add_layout(tokenizer, SEMANTIC_SPEC)


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one intra-op thread than on two contended ones (2-core CI)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Session-scoped: loading and extending a 151k vocabulary takes seconds; tests must not change these tokenizers.
@pytest.fixture(scope="session")
def real_qwen(real_qwen_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(real_qwen_tokenizer_path)
    return tokenizer, add_layout(tokenizer, SEMANTIC_SPEC)


@pytest.fixture(scope="session")
def real_llama(real_llama_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(real_llama_tokenizer_path)
    return tokenizer, add_layout(tokenizer, SEMANTIC_SPEC)


@pytest.fixture(scope="session")
def shipped_llama_tokenizer_path(tmp_path_factory):
    """Mistral-7B's LLaMA-kind SentencePiece tokenizer exactly as it ships: no pad token, like LLaMA-2 and Vicuna
    checkpoints (the `real_llama_tokenizer_path` one pads with unk, as their fine-tunes set it)."""
    from tests.conftest import wheel_asset
    from unimm.testing import MISTRAL_COMMON_WHEEL, build_sentencepiece_tokenizer

    path = tmp_path_factory.mktemp("shipped_llama_tok")
    build_sentencepiece_tokenizer(wheel_asset(*MISTRAL_COMMON_WHEEL), path, pad_token=None)
    return path


@pytest.fixture(scope="session")
def real_llama_legacy(real_llama_tokenizer_path):
    """The same SentencePiece model loaded with `legacy=True` (Metaspace `prepend_scheme="always"`): text after a
    special token gets its own word-start `▁` (`</s>▁What`), as SentencePiece gives every separately encoded
    piece, where transformers' default continues it (`</s>What`)."""
    tokenizer = AutoTokenizer.from_pretrained(real_llama_tokenizer_path, legacy=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("</s>What", add_special_tokens=False)["input_ids"]) == [
        "</s>", "▁What"]
    return tokenizer, add_layout(tokenizer, SEMANTIC_SPEC)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny VQRAE visual tokenizer (seeded random weights) the code-cache and pretokenize tests encode with."""
    from unimm.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer("vqrae-tiny").eval()
