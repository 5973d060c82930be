"""LLaVA JSON and text readers: exact LLaVA records, odd records normalised (not crashing Arrow), streaming."""

from __future__ import annotations

import json

import pytest

from unimm.data.images import ImageTransform
from unimm.data.mixture import MixtureDataset
from unimm.data.sequence import SampleError
from unimm.data.sources import read_llava_json, read_text_records
from unimm.data.tasks import PixelImages, TaskDataset

LLAVA = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."}]},
    {"id": 42, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "multi", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}]},
    {"id": "no-conv", "image": "a.png"},
    {"id": "bad-image", "image": 7, "conversations": []},
    "not a record",
]


def test_read_llava_json_normalises_records(tmp_path):
    path = tmp_path / "llava_v1_5_mix.json"
    path.write_text(json.dumps(LLAVA))
    records = read_llava_json(path)
    assert records.column_names == ["id", "images", "conversations", "malformed"]
    assert records["id"] == ["000000033471", "42", "multi", "no-conv", "bad-image", "llava_v1_5_mix.json-5"]
    assert records[0]["images"] == ["coco/train2017/000000033471.jpg"] and records[1]["images"] == []
    assert records[2]["images"] == ["a.png", "b.png"]
    assert records[0]["conversations"][1] == {"from": "gpt", "value": "The bus in the image is white and red."}
    assert [r["malformed"] for r in records][3:] == [
        "record has no 'conversations'", "'image' must be a path or a list of paths, got int",
        "record is a str, not an object"]
    jsonl = tmp_path / "llava.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in LLAVA[:3]) + "\n{broken json\n")
    streamed = list(read_llava_json(jsonl, streaming=True))
    assert [r["id"] for r in streamed] == ["000000033471", "42", "multi", "llava.jsonl-3"]
    assert "llava.jsonl:4:2: invalid JSON" in streamed[3]["malformed"]  # file:line:column
    with pytest.raises(FileNotFoundError, match="LLaVA conversation file not found"):
        read_llava_json(tmp_path / "missing.json")


def test_read_text_records(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    assert read_text_records(tmp_path / "t.txt")["text"] == ["first line", "second line"]
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(ValueError, match="record 1 has no string field 'text'"):
        read_text_records(tmp_path / "t.jsonl")


def test_pixel_images_load_relative_to_folder_and_fail_with_id(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    provider = PixelImages(tmp_path, ImageTransform(8), num_positions=4)
    slot = provider("a.png", "s1")
    assert slot.pixel_values.shape == (3, 8, 8) and slot.length == 4 and slot.image_key == "a.png"
    with pytest.raises(SampleError, match="sample s2: .*image file not found"):
        provider("b.png", "s2")


def test_mixture_weights_permutations_and_determinism():
    def dataset(name, n):
        return TaskDataset([{"id": f"{name}{i}"} for i in range(n)], lambda r, epoch: (r["id"], epoch), "text")

    mixture = MixtureDataset({"a": (dataset("a", 10), 3.0), "b": (dataset("b", 7), 1.0),
                              "off": (dataset("c", 3), 0.0)}, num_samples=2000, seed=5)
    assert mixture.names == ["a", "b"]
    items = [mixture[i] for i in range(len(mixture))]
    share = sum(1 for sid, _ in items if sid.startswith("a")) / len(items)
    assert abs(share - 0.75) < 0.04
    first_a = [sid for sid, epoch in items if sid.startswith("a") and epoch == 0]
    assert sorted(first_a) == sorted(f"a{i}" for i in range(10))  # each record once per epoch
    assert max(epoch for _, epoch in items) > 0
    again = MixtureDataset({"a": (dataset("a", 10), 3.0), "b": (dataset("b", 7), 1.0)}, num_samples=2000, seed=5)
    assert [again[i] for i in range(2000)] == items
    with pytest.raises(ValueError, match="no source with a positive weight"):
        MixtureDataset({"a": (dataset("a", 3), 0.0)})


def test_streaming_conversations_through_dataloader_and_collator(tmp_path, qwen):
    import torch

    from unimm.data.bad_samples import BadSampleTracker
    from unimm.data.collator import UniMMCollator
    from unimm.data.sequence import ImageSlot
    from unimm.data.tasks import IterableTaskDataset, SampleFactory, conversation_dataset

    tokenizer, layout = qwen
    lines = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": f"colour {i}"}]}
        for i in range(5)]
    lines.insert(2, {"id": "broken", "image": "x.png"})
    path = tmp_path / "stream.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    codes = {"semantic": torch.zeros(3, 1, dtype=torch.long)}
    tracker = BadSampleTracker(max_bad_fraction=0.5, min_seen=0)
    tracker.record_ok(2)
    dataset = conversation_dataset(read_llava_json(path, streaming=True), SampleFactory(tokenizer, layout),
                                   lambda ref, sid: ImageSlot(codes=codes, image_key=ref), tracker)
    assert isinstance(dataset, IterableTaskDataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2,
                                         collate_fn=UniMMCollator(pad_token_id=tokenizer.pad_token_id))
    batches = list(loader)
    assert [sid for b in batches for sid in b["sample_ids"]] == [f"r{i}" for i in range(5)]
    assert tracker.summary()["bad_examples"] == [["broken", "record has no 'conversations'"]]


def test_generation_prompt_has_no_targets_and_matches_template(qwen):
    from unimm.data.sequence import ImageSlot
    from unimm.data.tasks import SampleFactory
    from unimm.data.templates import ChatMessage

    tokenizer, layout = qwen
    slot = ImageSlot(num_positions=4)
    prompt = SampleFactory(tokenizer, layout).generation_prompt([ChatMessage("user", [slot, "\nwhat colour?"])])
    assert prompt.num_supervised == 0 and len(prompt.image_spans) == 1
    text = tokenizer.decode(prompt.input_ids).replace("<|boi|>" + "<|image|>" * 4 + "<|eoi|>", "<image>")
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nwhat colour?"}],
                                                 tokenize=False, add_generation_prompt=True)
