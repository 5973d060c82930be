"""Vocabulary extension: special tokens, flat code block, mean-initialised rows, padding, stability on reload."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.llm.conftest import VQRAE_SPEC, make_unimm
from unimm.llm import SPECIAL_TOKENS, UniMMForCausalLM, encode_plain_text, extend_tokenizer_and_model
from unimm.llm.vocab import code_token

TEXT = "a red circle on the left, what shape is in the picture?"


def test_extension_keeps_existing_ids_and_rows(tiny_llm_path):
    original_tokenizer = AutoTokenizer.from_pretrained(tiny_llm_path)
    original = AutoModelForCausalLM.from_pretrained(tiny_llm_path)
    model, tokenizer, layout = make_unimm(tiny_llm_path, VQRAE_SPEC)

    assert tokenizer(TEXT)["input_ids"] == original_tokenizer(TEXT)["input_ids"]
    n = layout.original_vocab_size
    assert n == len(original_tokenizer)
    ids = [layout.boi_token_id, layout.eoi_token_id, layout.image_token_id, layout.uncond_token_id]
    assert ids == tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) and len(set(ids)) == 4 and min(ids) >= n

    for new, old in ((model.get_input_embeddings().weight, original.get_input_embeddings().weight),
                     (model.get_output_embeddings().weight, original.get_output_embeddings().weight)):
        assert new.shape[0] == layout.padded_vocab_size and new.shape[0] % 128 == 0
        assert new.shape[0] >= len(tokenizer)
        assert torch.equal(new[:n], old[:n])
        mean = old[:n].mean(dim=0)
        torch.testing.assert_close(new[n:], mean.expand(new.shape[0] - n, -1))
    assert model.config.text_config.vocab_size == layout.padded_vocab_size


def test_user_text_spelling_special_tokens_stays_plain(tiny_llm_path):
    _, tokenizer, layout = make_unimm(tiny_llm_path, VQRAE_SPEC)
    special = {layout.boi_token_id, layout.eoi_token_id, layout.image_token_id, layout.uncond_token_id}
    assert tokenizer("<|boi|>", add_special_tokens=False)["input_ids"] == [layout.boi_token_id]
    ids = encode_plain_text(tokenizer, "draw <|boi|> a circle <|image|><|eoi|>")
    assert not special & set(ids)
    assert "<|boi|>" in tokenizer.decode(ids)


def test_layout_stable_after_save_and_reload(tiny_llm_path, tmp_path):
    model, tokenizer, layout = make_unimm(tiny_llm_path, VQRAE_SPEC, flat_codes=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tokenizer2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = UniMMForCausalLM.from_pretrained(tmp_path)
    assert model2.config.layout == layout
    assert tokenizer2.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert tokenizer2.convert_tokens_to_ids(code_token(5)) == layout.code_token_offset + 5
    # extending a saved, extended pair again is a no-op
    rows_before = model2.get_input_embeddings().weight.clone()
    assert extend_tokenizer_and_model(tokenizer2, model2, VQRAE_SPEC, flat_codes=True) == layout
    assert len(tokenizer2) == len(tokenizer)
    assert torch.equal(model2.get_input_embeddings().weight, rows_before)


def test_flat_mode_code_block_is_contiguous_and_predicted_by_lm_head(tiny_llm_path):
    model, tokenizer, layout = make_unimm(tiny_llm_path, VQRAE_SPEC, flat_codes=True)
    num_codes = VQRAE_SPEC["semantic"][0]
    assert layout.flat_codes and layout.num_flat_codes == num_codes
    ids = tokenizer.convert_tokens_to_ids([code_token(k) for k in range(num_codes)])
    assert ids == list(range(layout.code_token_offset, layout.code_token_offset + num_codes))
    assert model.depth_heads is None and model.visual_embedding is None
    assert model.get_output_embeddings().weight.shape[0] >= layout.code_token_offset + num_codes
    # user text spelling a code token is not a code
    assert layout.code_token_offset not in encode_plain_text(tokenizer, code_token(0))


def test_plain_hf_model_can_be_extended(tiny_qwen2_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    layout = extend_tokenizer_and_model(tokenizer, model, {"semantic": (100, 1)}, flat_codes=True)
    assert model.get_input_embeddings().weight.shape[0] == layout.padded_vocab_size == 512
    assert layout.code_token_offset + 100 <= 512


def test_new_rows_sample_the_text_rows_distribution_like_mean_resizing(tiny_qwen2_path):
    """As transformers' `mean_resizing`: N(mean, 1e-9 x covariance) of the text rows; rows are distinct (flat-mode
    code rows tied to the LM head would otherwise give every code the same logit)."""
    from unimm.llm.vocab import NEW_ROW_COVARIANCE_SCALE

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    text_rows = model.get_input_embeddings().weight[: len(tokenizer)].detach().clone().double()
    torch.manual_seed(0)
    layout = extend_tokenizer_and_model(tokenizer, model, {"semantic": (4096, 1)}, flat_codes=True)
    new = model.get_input_embeddings().weight[layout.original_vocab_size:].detach().double()
    assert torch.unique(new, dim=0).shape[0] == new.shape[0]  # all distinct
    mean = text_rows.mean(dim=0)
    torch.testing.assert_close(new.mean(dim=0), mean, rtol=0, atol=1e-6)
    # the spread follows the text rows' covariance, scaled by 1e-9
    reference = torch.cov(text_rows.T) * NEW_ROW_COVARIANCE_SCALE
    sampled = torch.cov(new.T)
    correlation = torch.corrcoef(torch.stack([reference.flatten(), sampled.flatten()]))[0, 1]
    assert correlation > 0.9
    assert 0.8 < float(sampled.diagonal().sum() / reference.diagonal().sum()) < 1.25


def test_text_tokenizer_is_the_keyword_and_tokenizer_a_deprecated_one(tiny_llm_path, caplog):
    """The text tokenizer is `text_tokenizer=` in the public functions that take one; the old `tokenizer=` still
    works, to the same result, with one warning per function."""
    import logging

    import pytest

    from unimm.data.templates import get_chat_format
    from unimm.llm.layout import t2i_prefix_ids

    old_tokenizer, new_tokenizer = (AutoTokenizer.from_pretrained(tiny_llm_path) for _ in range(2))
    with caplog.at_level(logging.WARNING):
        layouts = []
        for keyword, text_tokenizer in (("tokenizer", old_tokenizer), ("text_tokenizer", new_tokenizer)):
            model = UniMMForCausalLM.from_llm(tiny_llm_path, VQRAE_SPEC)
            layouts.append(extend_tokenizer_and_model(model=model, codebook_spec=VQRAE_SPEC,
                                                      **{keyword: text_tokenizer}))
        assert layouts[0] == layouts[1]
        assert encode_plain_text(tokenizer=old_tokenizer, text=TEXT) == encode_plain_text(new_tokenizer, TEXT)
        assert t2i_prefix_ids(tokenizer=old_tokenizer, layout=layouts[0], prompt="a") == t2i_prefix_ids(
            text_tokenizer=new_tokenizer, layout=layouts[1], prompt="a")
        assert type(get_chat_format(tokenizer=old_tokenizer)) is type(get_chat_format(text_tokenizer=new_tokenizer))
    warned = [r.getMessage() for r in caplog.records if "(tokenizer=...) is deprecated" in r.getMessage()]
    assert all("use text_tokenizer=" in message for message in warned)
    with pytest.raises(TypeError, match="pass text_tokenizer= only"):
        encode_plain_text(tokenizer=old_tokenizer, text_tokenizer=new_tokenizer, text=TEXT)
