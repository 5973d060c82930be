"""UniMMForCausalLM: parity with the wrapped HF model, visual inputs, save/load round trip, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.llm.conftest import DUAL_SPEC, VQRAE_SPEC, image_batch, make_unimm
from unimm.llm import UniMMForCausalLM


def _text_batch(tokenizer):
    texts = ["a red circle on the left", "what shape is in the picture? it is"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :2] = -100  # some unsupervised positions
    return enc["input_ids"], enc["attention_mask"], labels


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_text_only_parity_with_wrapped_hf_model(family, request):
    from transformers import AutoTokenizer

    tiny_llm_path = request.getfixturevalue(f"tiny_{family}_path")

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_path)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llm_path).eval()
    model = UniMMForCausalLM.from_llm(tiny_llm_path, DUAL_SPEC, depth_head_hidden_size=32,
                                      depth_head_num_heads=2).eval()
    input_ids, attention_mask, labels = _text_batch(tokenizer)
    with torch.no_grad():
        ref = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        ours_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ours = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(ours_logits, ref.logits)
    assert ours.logits is None  # training-style call: the LM head ran on supervised positions only
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.text_loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert ours.visual_losses == {}


def test_image_batch_forward_and_round_trip(tiny_qwen2_path, tmp_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle", "a blue square at the top"], num_positions=5)
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_logits=True)
    assert set(out.visual_losses) == {"pixel", "semantic"}
    assert out.visual_depth_losses["pixel"].shape == (3,) and out.visual_depth_losses["semantic"].shape == (2,)
    assert out.logits.shape == (*batch["input_ids"].shape, layout.padded_vocab_size)

    # codes change the embedding of their position: different codes -> different hidden states after it
    other = {k: v.clone() for k, v in batch["visual_codes"].items()}
    other["pixel"][other["pixel"] >= 0] = (other["pixel"][other["pixel"] >= 0] + 1) % 32
    with torch.no_grad():
        changed = model(**{**batch, "visual_codes": other}, return_logits=True)
    assert not torch.allclose(changed.logits, out.logits)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = UniMMForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layout == layout
    assert list(reloaded.config.codebook_spec) == ["pixel", "semantic"]
    with torch.no_grad():
        again = reloaded(**batch, return_logits=True)
    assert torch.equal(again.logits, out.logits)
    torch.testing.assert_close(again.loss, out.loss)


def test_continuous_features_fill_image_positions_in_order(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, VQRAE_SPEC, feature_dim=12)
    model.eval()
    ids = tokenizer("describe the image", add_special_tokens=False)["input_ids"]
    n = 4
    input_ids = torch.tensor([[layout.boi_token_id] + [layout.image_token_id] * n + [layout.eoi_token_id] + ids] * 2)
    features = torch.randn(2, n, 12)
    embeds = model.embed_inputs(input_ids, image_features=features)
    expected = model.feature_projector(features)
    torch.testing.assert_close(embeds[:, 1 : 1 + n], expected)
    torch.testing.assert_close(embeds[:, 0], model.get_input_embeddings().weight[layout.boi_token_id].expand(2, -1))
    with pytest.raises(ValueError, match="image_features provide"):
        model.embed_inputs(input_ids, image_features=features[:1])
    with pytest.raises(ValueError, match="no codes but image_features"):
        model.embed_inputs(input_ids)


def test_bad_visual_codes_raise_with_sample_ids(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle"], num_positions=3)
    bad = {k: v.clone() for k, v in batch["visual_codes"].items()}
    bad["semantic"][bad["semantic"] >= 0] = 99  # beyond 16 codes
    with pytest.raises(ValueError, match=r"visual_codes\['semantic'\].*sample-7"):
        model(**{**batch, "visual_codes": bad}, sample_ids=["sample-7"])


def test_activation_checkpointing_reaches_the_wrapped_llm(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    model.train()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and model.language_model.is_activation_checkpointing
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle"], num_positions=3)
    model(**batch).loss.backward()
    assert model.language_model.get_decoder().layers[0].mlp.up_proj.weight.grad is not None
