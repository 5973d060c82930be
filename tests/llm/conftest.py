"""Fixtures for unimm.llm tests: tiny extended UniMM models over the tiny Qwen2 / LLaMA checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model

DUAL_SPEC = {"pixel": (32, 3), "semantic": (16, 2)}  # DualToken-like: two groups with depth
VQRAE_SPEC = {"semantic": (64, 1)}  # VQRAE-like: one group, depth 1
HEAD_KWARGS = dict(depth_head_hidden_size=32, depth_head_num_heads=2, depth_head_layers=2, code_embed_dim=16)


def make_unimm(path, spec, flat_codes=False, seed=0, **kwargs):
    """Load the tiny checkpoint at `path`, wrap it, extend its tokenizer; returns (model, tokenizer, layout)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = UniMMForCausalLM.from_llm(path, spec, flat_codes=flat_codes, **{**HEAD_KWARGS, **kwargs})
    layout = extend_tokenizer_and_model(tokenizer, model, spec, flat_codes=flat_codes)
    return model, tokenizer, layout


@pytest.fixture(params=["qwen2", "llama"])
def tiny_llm_path(request, tiny_qwen2_path, tiny_llama_path):
    return tiny_qwen2_path if request.param == "qwen2" else tiny_llama_path


def image_batch(tokenizer, layout, spec, prompts, num_positions, seed=0):
    """A t2i batch per CONTRACTS.md: prefix, N image positions, <|eoi|>; labels on the image and <|eoi|>.
    Right-padded. Returns dict(input_ids, attention_mask, labels, visual_codes)."""
    from unimm.llm import t2i_prefix_ids

    gen = torch.Generator().manual_seed(seed)
    rows = [t2i_prefix_ids(tokenizer, layout, p) for p in prompts]
    length = max(len(r) for r in rows) + num_positions + 1
    batch = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, length), pad)
    labels = torch.full((batch, length), -100)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    codes = {name: torch.full((batch, length, s[1]), -1) for name, s in spec.items()}
    for i, prefix in enumerate(rows):
        start = len(prefix)
        seq = prefix + [layout.image_token_id] * num_positions + [layout.eoi_token_id]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
        for name, (num_codes, depth) in spec.items():
            codes[name][i, start : start + num_positions] = torch.randint(0, num_codes, (num_positions, depth),
                                                                         generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, visual_codes=codes)


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory, qwen_tokenizer_path):
    """A tiny random Qwen3ForCausalLM with the Qwen-style tokenizer."""
    from unimm.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3",
                          AutoTokenizer.from_pretrained(qwen_tokenizer_path))
