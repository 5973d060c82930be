"""Collation: right padding, packing with restarted position ids (same per-sample loss as unpacked, with a real
tiny Qwen2), visual codes / features batching, and modality/length grouping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.collator import GroupedBatchSampler, UniMMCollator
from unimm.data.sequence import ImageSlot
from unimm.data.sources import normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.llm.layout import IGNORE_INDEX

from .conftest import DUAL_SPEC, add_layout

TEXTS = [
    ("hello world", "the quick brown fox jumps over the lazy dog"),
    ("what colour is the shape?", "the shape is yellow"),
    ("describe the image in one sentence please", "a red circle on the left of the image"),
    ("where is the shape?", "bottom left."),
    ("what shape is in the picture?", "it is a circle"),
]


def _conversation_samples(factory):
    samples = []
    for i, (question, answer) in enumerate(TEXTS):
        record = normalise_llava_record({"id": f"s{i}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}, i, "f")
        samples.append(factory.conversation(record, []))
    return samples


def _per_sample_losses(logits, batch, spans):
    """spans: per sample (row, start, stop). Summed next-token CE over the sample's supervised targets."""
    losses = []
    for row, start, stop in spans:
        row_logits = logits[row, start:stop - 1].float()
        targets = batch["labels"][row, start + 1:stop]
        losses.append(torch.nn.functional.cross_entropy(row_logits, targets, ignore_index=IGNORE_INDEX,
                                                        reduction="sum"))
    return torch.stack(losses)


def test_packed_batch_gives_the_same_per_sample_loss_as_unpacked(qwen, tiny_qwen2_path, one_thread):
    tokenizer, layout = qwen
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, attn_implementation="sdpa").eval()
    model.resize_token_embeddings(len(tokenizer))
    samples = _conversation_samples(SampleFactory(tokenizer, layout))
    lengths = [len(s) for s in samples]

    padded = UniMMCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    assert padded["input_ids"].shape == (5, max(lengths)) and "position_ids" not in padded
    assert padded["attention_mask"].sum(1).tolist() == lengths
    assert padded["sample_ids"] == [f"s{i}" for i in range(5)]
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    unpacked = _per_sample_losses(logits, padded, [(i, 0, n) for i, n in enumerate(lengths)])

    row_length = sum(lengths[:3]) + 1
    collator = UniMMCollator(pad_token_id=tokenizer.pad_token_id, packing=True, max_length=row_length)
    packed = collator(samples)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] < 5  # several samples share rows
    spans, row, offset = [], 0, 0
    for n in lengths:  # first-fit in arrival order: rebuild where each sample landed
        if offset + n > row_length:
            row, offset = row + 1, 0
        spans.append((row, offset, offset + n))
        assert packed["position_ids"][row, offset:offset + n].tolist() == list(range(n))
        offset += n
    with torch.no_grad():
        # use_cache=False: transformers only derives the packed mask when no KV cache is passed or created.
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    packed_losses = _per_sample_losses(logits, packed, spans)
    torch.testing.assert_close(packed_losses, unpacked, rtol=1e-4, atol=1e-4)

    # Control: the same rows with one running position sequence (no restart) let samples see each other.
    running = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    with torch.no_grad():
        leaked = model(input_ids=packed["input_ids"], position_ids=running, use_cache=False).logits
    leaked = _per_sample_losses(leaked, packed, spans)
    later = [i for i, (_, start, _) in enumerate(spans) if start > 0]
    assert not torch.allclose(leaked[later], unpacked[later], rtol=1e-3, atol=1e-3)


def test_collator_batches_visual_codes_features_and_counts_over_long(qwen_tokenizer_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    layout = add_layout(tokenizer, DUAL_SPEC)
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.0))
    codes = {"pixel": torch.randint(0, 16, (12, 3)), "semantic": torch.randint(0, 8, (12, 2))}
    t2i = factory.t2i("t", "a red circle", codes)
    caption = factory.caption("c", "a blue triangle", ImageSlot(num_positions=5, features=torch.randn(5, 6)))
    batch = UniMMCollator(pad_token_id=tokenizer.pad_token_id)([t2i, caption])
    assert set(batch["visual_codes"]) == {"pixel", "semantic"}
    assert batch["visual_codes"]["pixel"].shape == (2, batch["input_ids"].shape[1], 3)
    (start, stop), = t2i.image_spans
    assert torch.equal(batch["visual_codes"]["pixel"][0, start:stop], codes["pixel"])
    assert (batch["visual_codes"]["semantic"][1] == -1).all()  # the caption image is continuous
    assert batch["image_features"].shape == (1, 5, 6)
    feature_positions = (batch["input_ids"] == layout.image_token_id) & (batch["visual_codes"]["pixel"][..., 0] < 0)
    assert int(feature_positions.sum()) == 5  # what the model consumes image_features with
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

    assert len(t2i) > len(caption)
    tracker = BadSampleTracker(max_bad_fraction=0.5, min_seen=0)
    short = UniMMCollator(pad_token_id=0, max_length=len(caption), tracker=tracker)
    tracker.record_ok(3)
    assert short([t2i, caption])["sample_ids"] == ["c"]
    assert tracker.summary()["bad_examples"][0][0] == "t"
    with pytest.raises(ValueError, match="sample t has .* tokens > max_length"):
        UniMMCollator(pad_token_id=0, max_length=len(caption))([t2i])


def test_grouped_batch_sampler_keeps_one_task_per_batch():
    tasks = ["t2i"] * 10 + ["caption"] * 7 + ["text"] * 5
    lengths = list(range(22))
    sampler = GroupedBatchSampler(tasks, lengths, batch_size=4, seed=1, mega_batch_factor=2)
    order = list(sampler)
    assert len(order) == len(sampler) == 12 + 8 + 8
    chunks = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(len({tasks[i] for i in chunk}) == 1 for chunk in chunks)
    assert set(order) == set(range(22))
    # One mega-batch holds all of a task's indices: t2i batches are lengths [9..6], [5..2], [1, 0, +2 refills].
    whole = GroupedBatchSampler(tasks, lengths, batch_size=4, seed=1, mega_batch_factor=3).batches()
    t2i = sorted((b for b in whole if tasks[b[0]] == "t2i"), key=lambda b: -lengths[b[0]])
    assert [b[:2] for b in t2i] == [[9, 8], [5, 4], [1, 0]] and t2i[0] == [9, 8, 7, 6]
    assert list(GroupedBatchSampler(tasks, lengths, 4, seed=1, mega_batch_factor=2)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
