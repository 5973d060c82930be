"""`UniMMForCausalLM.from_llm`: the number of image positions from a visual tokenizer, and dtypes (the LLM as
loaded, new visual modules float32 unless a dtype is asked for)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.llm.conftest import HEAD_KWARGS, image_batch
from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.tokenizer import build_tokenizer

VISUAL = ("visual_embedding", "depth_heads")


@pytest.fixture(scope="module")
def bf16_qwen2_path(tmp_path_factory, tiny_qwen2_path):
    """The tiny Qwen2 checkpoint saved in bfloat16, as real checkpoints are."""
    path = tmp_path_factory.mktemp("bf16_qwen2")
    AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_qwen2_path).save_pretrained(path)
    return path


def _dtypes(model: UniMMForCausalLM, prefix: str) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if n.startswith(prefix)}


def test_from_llm_takes_spec_and_positions_from_a_visual_tokenizer(tiny_qwen2_path):
    from unimm.llm.generation import generate_images

    visual = build_tokenizer("dualtoken-tiny", pixel_depth=2)
    model = UniMMForCausalLM.from_llm(tiny_qwen2_path, visual, **HEAD_KWARGS).eval()
    assert model.config.num_image_positions == visual.num_positions == 64
    assert {name: (g.num_codes, g.depth) for name, g in model.config.groups.items()} == {
        name: (g.num_codes, g.depth) for name, g in visual.codebook_spec.items()}
    text_tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    extend_tokenizer_and_model(text_tokenizer, model, visual.codebook_spec)
    codes = generate_images(model, text_tokenizer, ["a red circle"], cfg_scale=2.0, seed=0)  # no num_positions=
    assert codes["pixel"].shape == (1, 64, 2) and codes["semantic"].shape == (1, 64, 2)
    explicit = UniMMForCausalLM.from_llm(tiny_qwen2_path, visual, num_image_positions=16, **HEAD_KWARGS)
    assert explicit.config.num_image_positions == 16
    assert UniMMForCausalLM.from_llm(tiny_qwen2_path, visual.codebook_spec).config.num_image_positions is None


def test_from_llm_keeps_visual_modules_float32_next_to_a_bf16_checkpoint(bf16_qwen2_path):
    spec = {"pixel": (32, 3), "semantic": (16, 2)}
    model = UniMMForCausalLM.from_llm(bf16_qwen2_path, spec, **HEAD_KWARGS)
    assert _dtypes(model, "language_model") == {torch.bfloat16}
    for prefix in VISUAL:
        assert _dtypes(model, prefix) == {torch.float32}, prefix
    # the mixed model trains: the heads read the bf16 hidden states in their own dtype
    tokenizer = AutoTokenizer.from_pretrained(bf16_qwen2_path)
    layout = extend_tokenizer_and_model(tokenizer, model, spec)
    batch = image_batch(tokenizer, layout, spec, ["a red circle", "a blue square"], num_positions=4)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.depth_heads.parameters())
    for dtype in (torch.bfloat16, torch.float32):  # a dtype asked for applies to everything
        asked = UniMMForCausalLM.from_llm(bf16_qwen2_path, spec, dtype=dtype, **HEAD_KWARGS)
        assert {p.dtype for p in asked.parameters()} == {dtype}


@pytest.mark.parametrize("use_cache", [False, True])
def test_generation_on_a_mixed_dtype_model(bf16_qwen2_path, use_cache):
    from unimm.llm.generation import generate_images

    spec = {"pixel": (32, 3)}
    model = UniMMForCausalLM.from_llm(bf16_qwen2_path, spec, num_image_positions=4, **HEAD_KWARGS).eval()
    tokenizer = AutoTokenizer.from_pretrained(bf16_qwen2_path)
    extend_tokenizer_and_model(tokenizer, model, spec)
    codes = generate_images(model, tokenizer, ["a red circle"], cfg_scale=2.0, seed=0, use_cache=use_cache)
    assert codes["pixel"].shape == (1, 4, 3)
