"""The data layer against the real UniMM model and vocabulary extension: packed batches give the same loss as
padded ones with `UniMMForCausalLM` (visual codes included), and the inspection command on LLaVA data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from unimm.data.collator import UniMMCollator
from unimm.data.sequence import ImageSlot
from unimm.data.sources import normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory

SPEC = {"semantic": {"num_codes": 32, "depth": 2, "code_dim": 8}}


@pytest.fixture(scope="module")
def unimm_dir(tiny_qwen2_path, tmp_path_factory):
    from unimm.llm.modeling import UniMMForCausalLM
    from unimm.llm.vocab import extend_tokenizer_and_model

    path = tmp_path_factory.mktemp("unimm_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    torch.manual_seed(0)
    model = UniMMForCausalLM.from_llm(tiny_qwen2_path, SPEC, attn_implementation="sdpa")
    extend_tokenizer_and_model(tokenizer, model, SPEC)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _codes(n, seed):
    return {"semantic": torch.randint(0, 32, (n, 2), generator=torch.Generator().manual_seed(seed))}


def test_packed_unimm_batch_gives_the_same_loss_as_padded(unimm_dir, one_thread):
    from unimm.llm.modeling import UniMMForCausalLM

    model = UniMMForCausalLM.from_pretrained(unimm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(unimm_dir)
    factory = SampleFactory(tokenizer, model.config.layout, SampleConfig(uncond_prob=0.0))
    samples = [
        factory.t2i("t0", "a red circle on the left", _codes(6, 0)),
        factory.caption("c0", "a blue triangle in the centre", ImageSlot(codes=_codes(5, 1))),
        factory.conversation(normalise_llava_record({"id": "v0", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape?"},
            {"from": "gpt", "value": "the shape is yellow"}]}, 0, "f"), [ImageSlot(codes=_codes(4, 2))]),
        factory.t2i("t1", "a green square at the top right", _codes(6, 3)),
    ]
    padded = UniMMCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    row_length = max(len(samples[0]) + len(samples[1]), *(len(s) for s in samples)) + 2
    packed = UniMMCollator(pad_token_id=tokenizer.pad_token_id, packing=True, max_length=row_length)(samples)
    assert packed["input_ids"].shape[0] < 4 and "attention_mask" not in packed
    with torch.no_grad():
        reference = model(**padded, use_cache=False)
        result = model(**packed, use_cache=False)
        running = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
        leaked = model(**running, use_cache=False)
    assert set(reference.visual_losses) == {"semantic"}
    torch.testing.assert_close(result.text_loss, reference.text_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.visual_losses["semantic"], reference.visual_losses["semantic"], rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(result.loss, reference.loss, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaked.loss, reference.loss, rtol=1e-4, atol=1e-5)


def test_inspect_command_on_llava_data(unimm_dir, tmp_path, capsys):
    from unimm.cli.inspect_data import main

    records = [
        {"id": "first", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "The shape is red."},
            {"from": "human", "value": "Where?"},
            {"from": "gpt", "value": "left"}]},
        {"id": "broken", "image": "b.png"},
        {"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]},
    ]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records))
    main(["--model", str(unimm_dir), "--data", str(data), "--num_samples", "3", "--num_image_positions", "9"])
    out = capsys.readouterr().out
    assert "=== sample first (conversation):" in out and "1 image slot(s)" in out
    assert "[image 0: 9 positions, continuous features, a.png; 0 supervised]" in out
    assert "supervised text: 'The shape is red.<|im_end|>left<|im_end|>'" in out
    assert "=== sample broken: SKIPPED (sample broken: record has no 'conversations') ===" in out
    assert "supervised text: 'world<|im_end|>'" in out
    supervised_lines = [line for line in out.splitlines() if line[7:9] == "S "]
    assert "'<|im_end|>'" in supervised_lines[-1]
    assert not any("im_start" in line for line in supervised_lines)
