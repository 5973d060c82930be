"""The streaming mixture (`unimm.data.streaming`) over a real code cache and JSON Lines shards, read through
torchdata's `StatefulDataLoader` as the trainer reads it: mixture weights per step, disjoint readers that need only
their own shard files, exact resume from a state saved mid-shard and mid-window, single-task batches with
grouping, and packing of streamed batches."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from unimm.data.collator import UniMMCollator
from unimm.data.mixture import MixtureConfig, build_mixture
from unimm.data.tasks import SampleConfig, SampleFactory

NUM_RECORDS, SHARD_SIZE = 40, 5  # 8 code-cache shards


@pytest.fixture(scope="module")
def visual_tokenizer():
    from unimm.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer("vqrae-tiny").eval()


@pytest.fixture
def data(tmp_path, visual_tokenizer):
    """A code cache of 40 captioned records in 8 shards and a folder of 4 text shards (10 lines each)."""
    from unimm.data.code_cache import write_code_cache

    rng = np.random.default_rng(0)
    captions = [" ".join(["word"] * int(n)) + f" {i}" for i, n in enumerate(rng.integers(1, 30, NUM_RECORDS))]
    codes = {"semantic": rng.integers(0, 32, size=(NUM_RECORDS, 64, 1))}
    write_code_cache(tmp_path / "cache", visual_tokenizer, [f"img{i}" for i in range(NUM_RECORDS)], codes, captions,
                     shard_size=SHARD_SIZE)
    text = tmp_path / "text"
    text.mkdir()
    for shard in range(4):
        lines = [{"id": f"t{shard}-{i}", "text": "some text " * (1 + (7 * i + shard) % 9)} for i in range(10)]
        (text / f"part-{shard}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"cache": tmp_path / "cache", "text": text, "codes": codes, "captions": captions}


def _mixture(data, visual_tokenizer, qwen, **fields):
    text_tokenizer, layout = qwen
    factory = SampleFactory(text_tokenizer, layout, SampleConfig(uncond_prob=0.0, max_length=512))
    config = MixtureConfig(code_cache=str(fields.pop("cache", data["cache"])), text_data=str(data["text"]),
                           streaming=True, **{"shuffle_window": 4, "seed": 3, **fields})
    return build_mixture(config, factory, tokenizer_hash=visual_tokenizer)


def _loader(mixture, batch_size=1, num_workers=0, **configure):
    from torchdata.stateful_dataloader import StatefulDataLoader

    mixture.configure(batch_size=batch_size, **configure)
    return StatefulDataLoader(mixture, batch_size=batch_size, num_workers=num_workers, collate_fn=list)


def _ids(batches) -> list[list[str]]:
    return [[sample.sample_id for sample in batch] for batch in batches]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_weights_hold_at_every_step_and_records_become_their_tasks(data, visual_tokenizer, qwen):
    mixture = _mixture(data, visual_tokenizer, qwen, caption_weight=2.0, t2i_weight=1.0, text_weight=1.0)
    samples = [batch[0] for batch in _take(iter(_loader(mixture)), 200)]
    counts = Counter()
    for n, sample in enumerate(samples, start=1):
        counts[sample.task] += 1
        for task, weight in (("caption", 0.5), ("t2i", 0.25), ("text", 0.25)):
            assert abs(counts[task] - n * weight) < 1, (n, counts)
    # each sample is its record, built for its task: t2i supervises the codes, caption the text
    captions = dict(zip([f"img{i}" for i in range(NUM_RECORDS)], data["captions"]))
    for sample in samples:
        assert sample.sample_id in captions if sample.task in ("caption", "t2i") else sample.sample_id[0] == "t"
    # 100 captions from 40 records: every record was read (an epoch) before any came a third time
    seen = Counter(s.sample_id for s in samples if s.task == "caption")
    assert set(seen) == set(captions) and max(seen.values()) == 3


def test_readers_read_only_their_shards_disjoint_and_covering(data, visual_tokenizer, qwen, tmp_path):
    """2 ranks x 2 dataloader workers, each rank's node holding only its own 4 of the 8 shard files (plus the
    manifest): one epoch of both ranks is every record exactly once; the shard order differs between epochs."""
    nodes = []
    for rank in range(2):
        node = tmp_path / f"node{rank}"
        shutil.copytree(data["cache"], node)
        for shard in range(8):  # reader g = rank * 2 + worker reads shards g, g + 4
            if shard % 4 // 2 != rank:
                (node / f"shard-{shard:05d}.arrow").unlink()
        nodes.append(node)
    epochs = []
    for rank, node in enumerate(nodes):
        mixture = _mixture(data, visual_tokenizer, qwen, cache=node, caption_weight=1.0, t2i_weight=0.0)
        ids = [batch[0] for batch in _ids(_take(iter(_loader(mixture, num_workers=2, rank=rank, world_size=2)), 40))]
        epochs.append(ids)
    first = epochs[0][:20] + epochs[1][:20]  # 10 records per reader and epoch; the workers' batches alternate
    assert sorted(first) == sorted(f"img{i}" for i in range(NUM_RECORDS))
    assert sorted(epochs[0][20:] + epochs[1][20:]) == sorted(first)  # the next epoch: the same records ...
    assert epochs[0][20:] != epochs[0][:20]  # ... in another order
    # a rank whose node lacks one of its shards says which
    (nodes[0] / "shard-00004.arrow").unlink()
    mixture = _mixture(data, visual_tokenizer, qwen, cache=nodes[0], caption_weight=1.0, t2i_weight=0.0)
    with pytest.raises(Exception, match="shard-00004.arrow is unusable: the file is missing"):
        _take(iter(_loader(mixture, rank=0, world_size=2)), 40)


@pytest.mark.parametrize("num_workers,group", [(0, False), (2, True)])
def test_state_dict_resumes_exactly_mid_shard(data, visual_tokenizer, qwen, num_workers, group):
    fields = {"caption_weight": 1.0, "t2i_weight": 1.0, "text_weight": 1.0, "look_ahead_batches": 2}
    loader = _loader(_mixture(data, visual_tokenizer, qwen, **fields), batch_size=3, num_workers=num_workers,
                     group_by_length=group)
    batches = iter(loader)
    _take(batches, 5)  # 15 samples: mid-window (4), mid-shard (5) and mid-look-ahead (6) for every task
    state = loader.state_dict()
    reference = _take(batches, 12)
    del batches

    resumed = _loader(_mixture(data, visual_tokenizer, qwen, **fields), batch_size=3, num_workers=num_workers,
                      group_by_length=group)
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))  # as the trainer saves and loads it
    after = _take(iter(resumed), 12)
    assert _ids(after) == _ids(reference)
    for mine, theirs in zip(after, reference):
        for a, b in zip(mine, theirs):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)

    other = _loader(_mixture(data, visual_tokenizer, qwen, **fields), batch_size=2, num_workers=num_workers,
                    group_by_length=group)
    other.load_state_dict(state)
    if group:  # another batch size cuts the look-ahead buffers differently: refused, naming it
        with pytest.raises(Exception, match="batch_size: saved 3, now 2"):
            next(iter(other))


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_grouped_batches_hold_one_task_and_pack(data, visual_tokenizer, qwen):
    text_tokenizer, _ = qwen
    mixture = _mixture(data, visual_tokenizer, qwen, caption_weight=1.0, t2i_weight=1.0, text_weight=2.0,
                       look_ahead_batches=4)
    batches = _take(iter(_loader(mixture, batch_size=4, group_by_length=True)), 24)
    tasks = [{sample.task for sample in batch} for batch in batches]
    assert all(len(t) == 1 for t in tasks)
    assert Counter(next(iter(t)) for t in tasks) == {"text": 12, "caption": 6, "t2i": 6}
    # inside a look-ahead buffer the batches are cut from the samples sorted by length: a batch's lengths are
    # a contiguous run of the sorted buffer, so batches of one buffer do not interleave in length
    text_batches = [sorted(len(s) for s in batch) for batch in batches if batch[0].task == "text"][:4]
    spans = sorted((b[0], b[-1]) for b in text_batches)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans
    collator = UniMMCollator(pad_token_id=text_tokenizer.pad_token_id, packing=True, max_length=512)
    for batch in batches[:6]:
        packed = collator(batch)
        assert packed["input_ids"].shape[0] <= len(batch) and packed["sample_ids"] == [s.sample_id for s in batch]


def test_code_cache_shards_read_from_any_offset(data, visual_tokenizer, monkeypatch):
    """A shard read from a record offset, across the reader's conversion chunks, gives the records as written."""
    import unimm.data.streaming as streaming
    from unimm.data.shards import CodeCacheShards

    monkeypatch.setattr(streaming, "READ_CHUNK", 2)
    shards = CodeCacheShards(data["cache"], visual_tokenizer)
    assert shards.shards() == [f"shard-{i:05d}.arrow" for i in range(8)] and shards.has_text
    assert shards.num_records("shard-00003.arrow") == SHARD_SIZE
    records = list(shards.read("shard-00003.arrow", start=1))
    assert [r["id"] for r in records] == [f"img{i}" for i in range(16, 20)]
    for record, index in zip(records, range(16, 20)):
        assert record["text"] == data["captions"][index]
        assert np.array_equal(record["codes"]["semantic"], data["codes"]["semantic"][index])
    with pytest.raises(Exception, match="config hash"):
        CodeCacheShards(data["cache"], "another-config-hash")


def test_bad_records_are_skipped_and_counted(data, visual_tokenizer, qwen):
    """An empty text is a bad record: the stream skips it and the task's tracker counts it; past max_bad_fraction
    the run stops naming the records."""
    from unimm.data.bad_samples import TooManyBadSamplesError

    with open(data["text"] / "part-0.jsonl", "a") as shard:
        shard.write(json.dumps({"id": "empty", "text": "   "}) + "\n")
    mixture = _mixture(data, visual_tokenizer, qwen, caption_weight=0.0, t2i_weight=0.0, text_weight=1.0,
                       max_bad_fraction=0.5)
    ids = [batch[0].sample_id for batch in _take(iter(_loader(mixture)), 41)]
    assert "empty" not in ids and len(set(ids)) == 40  # one epoch of the 40 good records, then the next begins
    tracker = mixture.tasks[0].tracker
    assert tracker.num_bad == 1 and tracker.bad_examples == [("empty", "empty text")]

    mixture = _mixture(data, visual_tokenizer, qwen, caption_weight=0.0, t2i_weight=0.0, text_weight=1.0,
                       max_bad_fraction=0.0)
    with pytest.raises(TooManyBadSamplesError, match="empty"):
        _take(iter(_loader(mixture)), 45)


def test_json_shards_seek_to_any_record(tmp_path):
    """JSON Lines shards are indexed by line once and read from any record (blank lines skipped, a broken line a
    malformed record naming file and line); `.txt` lines and `.json` lists are shards too."""
    from unimm.data.shards import JsonShards

    folder = tmp_path / "conversations"
    folder.mkdir()
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    lines = [json.dumps({"id": f"c{i}", "conversations": turns}) for i in range(5)]
    lines.insert(2, "")
    lines[4] = '{"id": "broken", '
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "b.json").write_text(json.dumps([{"id": "j0", "conversations": turns}, {"id": "j1"}]))
    shards = JsonShards(folder, "conversation")
    assert shards.shards() == ["a.jsonl", "b.json"]
    records = list(shards.read("a.jsonl", start=1))
    assert [r["id"] for r in records] == ["c1", "c2", "a.jsonl-3", "c4"]  # the broken line is record 3
    assert records[0]["conversations"] == turns and records[0]["malformed"] is None
    assert "a.jsonl:5: record 3" in records[2]["malformed"] and "invalid JSON" in records[2]["malformed"]
    assert [r["id"] for r in shards.read("a.jsonl", start=4)] == ["c4"] and shards.num_records("a.jsonl") == 5
    assert [r["id"] for r in shards.read("b.json", start=1)] == ["j1"]
    assert list(shards.read("b.json", start=1))[0]["malformed"] == "record has no 'conversations'"

    (tmp_path / "lines.txt").write_text("first\n\nsecond\nthird\n")
    text = JsonShards(tmp_path / "lines.txt", "text")
    assert list(text.read("lines.txt", start=1)) == [{"id": "lines.txt-1", "text": "second", "shard_position": 1},
                                                     {"id": "lines.txt-2", "text": "third", "shard_position": 2}]


def test_image_shards_are_encoded_on_the_fly_into_the_tokenizers_codes(tmp_path, visual_tokenizer, qwen_tokenizer_path):
    """`image_shards` without a code cache: webdataset tars become caption / text-to-image samples whose codes are
    the visual tokenizer's codes of each image (encoded one at a time here, so batching cannot change them)."""
    import io
    import tarfile

    from PIL import Image

    from unimm.data.images import ImageTransform

    images = {}
    for shard in range(2):
        with tarfile.open(tmp_path / f"pairs-{shard}.tar", "w") as tar:
            for i in range(3):
                key = f"s{shard}-{i}"
                images[key] = Image.new("RGB", (40 + 8 * i, 36), (60 * i, 40 * shard + 20, 200 - 50 * i))
                buffer = io.BytesIO()
                images[key].save(buffer, format="PNG")
                for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.txt", f"picture {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    from transformers import AutoTokenizer

    from tests.data.conftest import add_layout

    text_tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    spec = {name: group.to_dict() for name, group in visual_tokenizer.codebook_spec.items()}
    factory = SampleFactory(text_tokenizer, add_layout(text_tokenizer, spec), SampleConfig(uncond_prob=0.0,
                                                                                           max_length=512))
    config = MixtureConfig(streaming=True, image_shards=str(tmp_path / "pairs-{0..1}.tar"), encode_batch_size=1,
                           caption_weight=1.0, t2i_weight=1.0, shuffle_window=2, seed=1)
    mixture = build_mixture(config, factory, tokenizer_hash=visual_tokenizer, visual_tokenizer=visual_tokenizer)
    samples = [batch[0] for batch in _take(iter(_loader(mixture, num_workers=2)), 12)]
    assert {s.task for s in samples} == {"caption", "t2i"} and {s.sample_id for s in samples} == set(images)
    transform = ImageTransform.for_tokenizer(visual_tokenizer)
    with torch.no_grad():
        expected = {key: visual_tokenizer.encode(transform.batch([image]))["semantic"][0]
                    for key, image in images.items()}
    for sample in samples:
        codes = sample.visual_codes["semantic"]
        assert torch.equal(codes[codes[:, 0] >= 0], expected[sample.sample_id].reshape(-1, codes.shape[1]).long())
    with pytest.raises(ValueError, match="image_shards=.* set streaming true"):
        MixtureConfig(image_shards=str(tmp_path / "pairs-{0..1}.tar"))
