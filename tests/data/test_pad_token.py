"""Tokenizers without a pad token (LLaMA-2, Vicuna, Mistral as they ship) get one when a model is built: the unk
token where there is one, as LLaVA does, else a new `<pad>` text token placed before UniMM's visual tokens."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from unimm.data.collator import UniMMCollator
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.llm.layout import SPECIAL_TOKENS
from unimm.llm.vocab import PAD_TOKEN, ensure_pad_token
from unimm.testing import build_tiny_llm
from unimm.train.args import ModelArguments
from unimm.train.llm.build import build_model

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """A tiny random CLIP tower: a new model needs an image encoder (LLaVA-1.5's model: tower + projector)."""
    from unimm.testing import build_tiny_vision_tower

    return str(build_tiny_vision_tower(tmp_path_factory.mktemp("tower") / "clip", "clip"))


def test_shipped_sentencepiece_tokenizer_pads_with_unk(shipped_llama_tokenizer_path, tower, tmp_path, caplog):
    shipped = AutoTokenizer.from_pretrained(shipped_llama_tokenizer_path)
    assert shipped.pad_token is None and shipped.unk_token == "<unk>"
    llm = build_tiny_llm(tmp_path / "llm", "llama", shipped, **TINY)
    with caplog.at_level(logging.INFO, logger="unimm.llm.vocab"):
        built = build_model(ModelArguments(llm_path=str(llm), vision_tower=tower))
    tokenizer, layout = built.text_tokenizer, built.layout
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert "the text tokenizer has no pad token: padding with its unk token '<unk>' (id 0)" in caplog.text
    # no token was added for the pad: the visual tokens follow the 32000 pieces, as with a pad-carrying tokenizer
    assert layout.original_vocab_size == len(shipped) == 32000 and layout.boi_token_id == 32000
    assert ensure_pad_token(tokenizer, built.model) is None  # already has one: nothing changes
    # the pad is saved with the tokenizer, so inference pads with the same token
    tokenizer.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["pad_token"] == "<unk>"
    # and the collator pads batches with it, masked out of attention and loss
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None))
    short, long = factory.text("a", "Hi."), factory.text("b", "A longer line of text to pad against.")
    batch = UniMMCollator(pad_token_id=tokenizer.pad_token_id)([short, long])
    assert batch["input_ids"][0, len(short):].eq(0).all() and not batch["attention_mask"][0, len(short):].any()
    assert batch["labels"][0, len(short):].eq(-100).all()


def test_tokenizer_without_pad_or_unk_gets_a_new_pad_token_before_the_visual_tokens(qwen_tokenizer_path, tower,
                                                                                    tmp_path):
    """Byte-level BPE tokenizers have no unk token: a `<pad>` special token is added to the text vocabulary, its
    embedding and LM head rows initialised at the text rows' mean, and UniMM's tokens come after it."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    tokenizer.pad_token = None
    assert tokenizer.unk_token is None
    tokenizer.save_pretrained(tmp_path / "tok")
    llm = build_tiny_llm(tmp_path / "llm", "qwen2", AutoTokenizer.from_pretrained(tmp_path / "tok"), **TINY)
    text_rows = len(tokenizer)
    built = build_model(ModelArguments(llm_path=str(llm), vision_tower=tower))
    tokenizer, layout, model = built.text_tokenizer, built.layout, built.model
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == text_rows
    assert layout.original_vocab_size == text_rows + 1  # the pad is a text token ...
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(text_rows + 1, text_rows + 5))
    assert [layout.boi_token_id, layout.eoi_token_id, layout.image_token_id, layout.uncond_token_id] == list(
        range(text_rows + 1, text_rows + 5))  # ... and the visual tokens follow it
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(llm)
    for new, old in ((model.get_input_embeddings().weight, original.get_input_embeddings().weight),
                     (model.get_output_embeddings().weight, original.get_output_embeddings().weight)):
        assert torch.equal(new[:text_rows], old)
        torch.testing.assert_close(new[text_rows], old.mean(dim=0))
    # text never spells the pad: "<pad>" in user text stays text
    assert tokenizer.pad_token_id not in SampleFactory(tokenizer, layout, SampleConfig()).text(
        "t", "write <pad> here").input_ids.tolist()
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").pad_token == PAD_TOKEN


def test_ensure_pad_token_without_a_model_and_on_a_model_with_spare_rows(qwen_tokenizer_path, tmp_path):
    """Without a model only the tokenizer changes; a model that already has a row for the new id (checkpoints pad
    their vocabulary) is not resized, but that row is initialised."""
    from transformers import AutoModelForCausalLM

    from unimm.testing import tiny_llm_config

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    tokenizer.pad_token = None
    rows = len(tokenizer)
    note = ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == rows and note == (
        f"the text tokenizer has no pad token and no unk token: added '<pad>' as its pad token (id {rows})")
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    tokenizer.pad_token = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llm_config("qwen2", vocab_size=rows + 8, **TINY))
    before = model.get_input_embeddings().weight.detach().clone()
    note = ensure_pad_token(tokenizer, model)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == rows + 8 and "grew" not in note
    torch.testing.assert_close(weight[rows], before[:rows].mean(dim=0))
    assert torch.equal(weight[rows + 1:], before[rows + 1:]) and torch.equal(weight[:rows], before[:rows])
