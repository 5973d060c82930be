"""Start-up independent of data size: the modality-length sampler takes lengths from metadata (`length_hints`), never
by building samples; the estimates track real sample lengths; the vectorised mixture schedule and batch sampler give
exactly what the per-item loops they replace gave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unimm.data.collator import GroupedBatchSampler
from unimm.data.mixture import MixtureDataset
from unimm.data.tasks import TaskDataset


def _english_lines() -> list[str]:
    """Real English text to tokenise: the Zen of Python (stdlib `this`, stored rot13), one aphorism per line."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line]


# ------------------------------------------------------------------------------- reference: the replaced loops


def _loop_schedule(sizes: list[int], probabilities: np.ndarray, num_samples: int, seed: int):
    """MixtureDataset's schedule as the per-item loop computed it before vectorisation."""
    rng = np.random.default_rng(seed)
    source_of = rng.choice(len(sizes), size=num_samples, p=probabilities)
    position = np.zeros(num_samples, dtype=np.int64)
    epoch = np.zeros(num_samples, dtype=np.int64)
    counters = np.zeros(len(sizes), dtype=np.int64)
    perms = {}
    for i, source in enumerate(source_of):
        size = sizes[source]
        e, offset = divmod(int(counters[source]), size)
        if (source, e) not in perms:
            perms[(source, e)] = np.random.default_rng([seed, source, e]).permutation(size)
        position[i] = perms[(source, e)][offset]
        epoch[i] = e
        counters[source] += 1
    return source_of, position, epoch


def _loop_batches(tasks: list[str], lengths: np.ndarray, batch_size: int, seed: int, epoch: int, mega: int):
    """GroupedBatchSampler.batches() as the per-task Python loop computed it before vectorisation."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for task in sorted(set(tasks)):
        indices = np.array([i for i, t in enumerate(tasks) if t == task])
        indices = indices[rng.permutation(len(indices))]
        for start in range(0, len(indices), mega):
            chunk = indices[start:start + mega]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
        short = batch_size - len(batches[-1])
        if short:
            batches[-1].extend(rng.choice(indices, size=short).tolist())
    return [batches[i] for i in rng.permutation(len(batches))]


# ------------------------------------------------------------------------------------------------ helpers


class Unbuildable:
    """Records whose sample build is counted and refused: start-up must not build any."""

    def __init__(self):
        self.calls = 0

    def __call__(self, record, epoch):
        self.calls += 1
        raise AssertionError(f"sample {record['id']} was built")


def _task(task: str, lengths: np.ndarray, build) -> TaskDataset:
    records = [{"id": f"{task}-{i}"} for i in range(len(lengths))]
    return TaskDataset(records, build, task, hints=lambda: lengths)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize(("sizes", "num_samples"), [([5, 3, 11], 200), ([1000, 40], 3000), ([17], None)])
def test_mixture_schedule_equals_the_per_item_walk(seed, sizes, num_samples):
    build = Unbuildable()
    weights = [1.0, 2.5, 0.5][:len(sizes)]
    sources = {f"s{i}": (_task("text", np.zeros(size, np.int64), build), w)
               for i, (size, w) in enumerate(zip(sizes, weights))}
    mixture = MixtureDataset(sources, num_samples, seed)
    probabilities = np.array(weights) / sum(weights)
    source_of, position, epoch = _loop_schedule(sizes, probabilities, num_samples or max(sizes), seed)
    assert np.array_equal(mixture.source_of, source_of)
    assert np.array_equal(mixture.position, position) and np.array_equal(mixture.epoch, epoch)
    assert epoch.max() > 0 or num_samples is None  # sources smaller than the draws restart (new permutations)


@pytest.mark.parametrize(("batch_size", "factor", "epoch"), [(4, 2, 0), (3, 16, 1), (8, 1, 2)])
def test_grouped_batches_equal_the_per_task_loop(batch_size, factor, epoch):
    rng = np.random.default_rng(batch_size)
    tasks = rng.choice(["t2i", "caption", "text", "conversation"], size=501, p=[0.4, 0.3, 0.2, 0.1]).tolist()
    lengths = rng.integers(5, 40, size=501)  # many ties: the stable order inside a mega-batch matters
    sampler = GroupedBatchSampler(tasks, lengths, batch_size, seed=3, mega_batch_factor=factor)
    sampler.set_epoch(epoch)
    expected = _loop_batches(tasks, lengths, batch_size, 3, epoch, batch_size * factor)
    assert sampler.batches() == expected
    assert list(sampler) == [i for batch in expected for i in batch] and len(sampler) == len(expected) * batch_size


def test_modality_sampler_builds_no_sample_and_groups_by_task_and_length():
    from unimm.train.llm.trainer import modality_length_sampler

    build = Unbuildable()
    rng = np.random.default_rng(0)  # distinct lengths per task, and sources larger than their draws: no ties
    lengths = {"caption": rng.choice(np.arange(70, 130), 60, replace=False),
               "t2i": rng.choice(np.arange(60, 200), 50, replace=False), "text": rng.choice(500, 45, replace=False)}
    mixture = MixtureDataset({task: (_task(task, hints, build), 1.0) for task, hints in lengths.items()}, 90, seed=2)
    sampler = modality_length_sampler(mixture, batch_size=4, seed=5)
    order = list(sampler)
    assert build.calls == 0
    hints = mixture.length_hints()
    assert np.array_equal(hints, np.array([lengths[str(t)][p] for t, p in zip(mixture.tasks, mixture.position)]))
    batches = np.array(order).reshape(-1, 4)
    assert all(len(set(mixture.tasks[batch])) == 1 for batch in batches)
    assert set(order) == set(range(90))
    for task in lengths:
        # One mega-batch (64 >= the task's draws) holds all of a task's items, so its batches, longest first, cut
        # the task's lengths sorted in descending order (the last batch topped up with random items of the task).
        count = int((mixture.tasks == task).sum())
        mine = sorted((batch for batch in batches if mixture.tasks[batch[0]] == task), key=lambda b: -hints[b[0]])
        walk = np.concatenate(mine)[:count]
        assert 16 < count <= 64 and np.all(np.diff(hints[walk]) < 0) and len(set(walk)) == count
    again = modality_length_sampler(MixtureDataset({t: (_task(t, h, build), 1.0) for t, h in lengths.items()}, 90,
                                                   seed=2), batch_size=4, seed=5)
    assert list(again) == order  # every rank computes the same order from the same metadata and seed


@pytest.fixture(scope="module")
def visual_tokenizer():
    from unimm.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer("vqrae-tiny").eval()


def _sentence(rng, num_lines: int) -> str:
    return " ".join(rng.choice(_english_lines(), size=num_lines))


def test_length_hints_track_real_sample_lengths(visual_tokenizer, real_qwen, tmp_path, one_thread):
    """Every task's estimate against the length of the sample really built, with Qwen2.5's tokenizer and a code
    cache written by the cache writer: image positions exact, text within the bytes-per-token estimate's error."""
    from unimm.data.code_cache import load_code_cache, write_code_cache
    from unimm.data.sources import read_llava_json, read_text_records
    from unimm.data.tasks import (
        CodeCacheImages,
        SampleConfig,
        SampleFactory,
        caption_dataset,
        conversation_dataset,
        t2i_dataset,
        text_dataset,
    )

    text_tokenizer, layout = real_qwen
    rng = np.random.default_rng(0)
    num = 24
    captions = [_sentence(rng, int(n)) for n in rng.integers(1, 16, num)]
    codes = {"semantic": rng.integers(0, 32, size=(num, 64, 1))}  # within the layout's 32 codes
    write_code_cache(tmp_path / "cache", visual_tokenizer, [f"img{i}" for i in range(num)], codes, captions,
                     shard_size=10)
    cache = load_code_cache(tmp_path / "cache", visual_tokenizer)
    assert cache.image_positions == 64 and np.array_equal(cache.text_bytes(), [len(c.encode()) for c in captions])
    llava = [{"id": f"v{i}", "image": f"img{i}", "conversations": [
        {"from": "human", "value": "<image>\n" + _sentence(rng, int(rng.integers(1, 4)))},
        {"from": "gpt", "value": _sentence(rng, int(rng.integers(1, 20)))}] * int(rng.integers(1, 4))}
        for i in range(num)]
    for record in llava:  # one image per record: later turns drop the placeholder
        record["conversations"][2:] = [{**t, "value": t["value"].replace("<image>\n", "")}
                                       for t in record["conversations"][2:]]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "text.txt").write_text("\n".join(_sentence(rng, int(n)) for n in rng.integers(1, 40, num)) + "\n")
    factory = SampleFactory(text_tokenizer, layout, SampleConfig(uncond_prob=0.0, max_length=4096))
    datasets = [caption_dataset(cache, factory), t2i_dataset(cache, factory),
                conversation_dataset(read_llava_json(tmp_path / "llava.json"), factory, CodeCacheImages(cache)),
                text_dataset(read_text_records(tmp_path / "text.txt"), factory)]
    for dataset in datasets:
        hints = dataset.length_hints()
        actual = np.array([len(dataset[i]) for i in range(len(dataset))])
        error = np.abs(hints - actual) / actual
        assert error.max() < 0.35, (dataset.task, hints, actual)  # Qwen2.5: ~4.6 bytes per token on this text
        rank = np.corrcoef(np.argsort(np.argsort(hints)), np.argsort(np.argsort(actual)))[0, 1]
        assert rank > 0.95, (dataset.task, rank)
    short = SampleFactory(text_tokenizer, layout, SampleConfig(uncond_prob=0.0, max_length=80))
    assert caption_dataset(cache, short).length_hints().max() == 80  # samples are cut at max_length, so are hints


def test_write_code_cache_round_trip(visual_tokenizer, tmp_path):
    from unimm.data.code_cache import load_code_cache, write_code_cache

    codes = {"semantic": np.arange(5 * 64).reshape(5, 64, 1) % 512}
    info = write_code_cache(tmp_path / "cache", visual_tokenizer, list("abcde"), codes, list("vwxyz"), shard_size=2)
    assert info["num_codes_written"] == 5 and len(info["shards"]) == 3
    cache = load_code_cache(tmp_path / "cache", visual_tokenizer)  # identity and every shard checksum verified
    assert cache.keys() == list("abcde") and cache[3]["text"] == "y"
    assert torch.equal(cache.codes_for("d")["semantic"], torch.from_numpy(codes["semantic"][3]).long())
    with pytest.raises(ValueError, match="already holds a code cache"):
        write_code_cache(tmp_path / "cache", visual_tokenizer, list("abcde"), codes, list("vwxyz"))
    with pytest.raises(ValueError, match=r"codes\['semantic'\] must be \[2, N, D\]"):
        write_code_cache(tmp_path / "other", visual_tokenizer, ["a", "b"], codes)


def test_large_llava_file_is_converted_once_and_memory_mapped(tmp_path, monkeypatch):
    from unimm.data import sources

    records = [{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nhello"},
                                                               {"from": "gpt", "value": "hi"}]},
               7, {"id": "c", "conversations": [{"from": "human", "value": "no image"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    parsed = list(sources.read_llava_json(tmp_path / "chat.json"))  # under the size threshold: parsed in memory
    assert not (tmp_path / "arrow").exists()
    first = sources.read_llava_json(tmp_path / "chat.json", arrow_dir=tmp_path / "arrow", arrow_min_bytes=0)
    (converted,) = (tmp_path / "arrow").iterdir()
    assert list(first) == parsed and first.cache_files[0]["filename"] == str(converted)

    def no_parse(path):
        raise AssertionError(f"{path} was parsed again")

    monkeypatch.setattr(sources, "_iter_json_records", no_parse)
    again = sources.read_llava_json(tmp_path / "chat.json", arrow_dir=tmp_path / "arrow", arrow_min_bytes=0)
    assert list(again) == parsed and sources.llava_length_stats(again)[1].tolist() == [2, 0, 1]
    monkeypatch.undo()
    records[0]["conversations"][1]["value"] = "edited"  # another file content: converted anew, never the old one
    (tmp_path / "chat.json").write_text(json.dumps(records))
    edited = sources.read_llava_json(tmp_path / "chat.json", arrow_dir=tmp_path / "arrow", arrow_min_bytes=0)
    assert edited[0]["conversations"][1]["value"] == "edited" and len(list((tmp_path / "arrow").iterdir())) == 2
