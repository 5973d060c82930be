"""Offline code cache with the real tiny VQRAE tokenizer: round trip, hash mismatch refused, resume after an
interruption gives identical shards, multi-process sharding, skipped images, and the program entry point."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from unimm.data.code_cache import CodeCacheMismatchError, finalize_code_cache, load_code_cache
from unimm.data.images import ImageTransform, load_image, read_image_records
from unimm.data.pretokenize import PretokenizeConfig, pretokenize, run_pretokenize

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 30), (200, 40, 200)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for i in range(10):
        image = Image.new("RGB", (40, 32), COLOURS[i % 5])
        image.paste((255, 255, 255), (4 * (i % 6), 3, 4 * (i % 6) + 10, 13))
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"shape {i}")
    return folder


def _shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*"))}


class _Interrupted(RuntimeError):
    pass


class _FailingTokenizer:
    """The real tokenizer, but `encode` raises after `calls` batches (a killed job)."""

    def __init__(self, tokenizer, calls):
        self._tokenizer = tokenizer
        self._calls = calls

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, pixel_values):
        if self._calls == 0:
            raise _Interrupted("killed")
        self._calls -= 1
        return self._tokenizer.encode(pixel_values)


def test_round_trip_resume_sharding_and_hash_check(tokenizer, image_folder, tmp_path, one_thread):
    records = read_image_records(image_folder)
    full = tmp_path / "full"
    result = pretokenize(records, tokenizer, full, batch_size=3, shard_size=4, show_progress=False)
    assert result.written_shards == [0, 1, 2] and result.skipped_shards == []
    info = finalize_code_cache(full, tokenizer)
    assert info["tokenizer_config_hash"] == tokenizer.config_hash()
    assert info["shapes"] == {"semantic": [tokenizer.num_positions, 1]}
    assert info["num_codes_written"] == 10 and info["num_skipped"] == 0
    assert info["codebook_spec"] == {"semantic": {"num_codes": 512, "depth": 1, "code_dim": 32}}

    cache = load_code_cache(full, tokenizer.config_hash())
    assert len(cache) == 10 and cache.keys() == [f"img{i:02d}" for i in range(10)]
    transform = ImageTransform(tokenizer.image_size, tokenizer.image_mean, tokenizer.image_std)
    pixels = torch.stack([transform(load_image(str(image_folder / f"img{i:02d}.png"), "x")) for i in (0, 7)])
    with torch.no_grad():
        expected = tokenizer.encode(pixels)["semantic"]
    assert torch.equal(cache[0]["codes"]["semantic"], expected[0]) and cache[7]["text"] == "shape 7"
    assert torch.equal(cache.codes_for("img07")["semantic"], expected[1])
    assert len({tuple(cache[i]["codes"]["semantic"].flatten().tolist()) for i in range(5)}) > 1

    with pytest.raises(CodeCacheMismatchError) as err:
        load_code_cache(full, "0123abcd")
    assert tokenizer.config_hash() in str(err.value) and "0123abcd" in str(err.value) and str(full) in str(err.value)
    with pytest.raises(KeyError, match="'nope' is not in the code cache"):
        cache.codes_for("nope")

    # Interrupted in the middle of shard 1 (after 2 batches: shard 0 = batches 1-2, shard 1 = batch 3 + ...).
    resumed = tmp_path / "resumed"
    with pytest.raises(_Interrupted):
        pretokenize(records, _FailingTokenizer(tokenizer, calls=3), resumed, batch_size=3, shard_size=4,
                    show_progress=False)
    assert sorted(p.name for p in resumed.glob("shard-*.json")) == ["shard-00000.json"]
    with pytest.raises(FileNotFoundError, match="pretokenize did not finish"):
        load_code_cache(resumed, tokenizer.config_hash())
    result = pretokenize(records, tokenizer, resumed, batch_size=3, shard_size=4, show_progress=False)
    assert result.skipped_shards == [0] and result.written_shards == [1, 2]
    assert _shard_bytes(resumed) == _shard_bytes(full)
    with pytest.raises(CodeCacheMismatchError, match="pretokenize run started with"):
        pretokenize(records, tokenizer, resumed, batch_size=3, shard_size=5, show_progress=False)

    # Two processes each write their shards (s % 2); the result equals the single-process cache.
    sharded = tmp_path / "sharded"
    for rank in (0, 1):
        mine = pretokenize(records, tokenizer, sharded, batch_size=3, shard_size=4, process_index=rank,
                           num_processes=2, show_progress=False)
        assert mine.written_shards == [s for s in range(3) if s % 2 == rank]
    finalize_code_cache(sharded, tokenizer)
    assert _shard_bytes(sharded) == _shard_bytes(full)


def test_bad_images_are_skipped_and_listed(tokenizer, image_folder, tmp_path, one_thread):
    import datasets

    good = read_image_records(image_folder)
    rows = [dict(good[i]) for i in range(4)] + [
        {"id": "corrupt", "image": str(tmp_path / "corrupt.jpg"), "text": "x"},
        {"id": "missing", "image": str(tmp_path / "missing.png"), "text": "y"},
    ]
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    records = datasets.Dataset.from_list(rows)
    out = tmp_path / "cache"
    pretokenize(records, tokenizer, out, batch_size=4, shard_size=4, max_bad_fraction=0.5, show_progress=False)
    info = finalize_code_cache(out, tokenizer, max_bad_fraction=0.5)
    assert info["num_codes_written"] == 4 and [s[0] for s in info["skipped"]] == ["corrupt", "missing"]
    assert "missing.png" in info["skipped"][1][1]
    cache = load_code_cache(out, tokenizer)
    assert "corrupt" not in cache and len(cache) == 4
    with pytest.raises(KeyError, match="2 image\\(s\\) were"):
        cache.codes_for("missing")
    from unimm.data.bad_samples import TooManyBadSamplesError

    with pytest.raises(TooManyBadSamplesError, match="corrupt"):
        pretokenize(records, tokenizer, tmp_path / "strict", batch_size=4, shard_size=4, max_bad_fraction=0.1,
                    show_progress=False)


def test_run_pretokenize_on_llava_images(tokenizer, image_folder, tmp_path, one_thread):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    llava = [
        {"id": "a", "image": "img00.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                            {"from": "gpt", "value": "red"}]},
        {"id": "b", "image": "img00.png", "conversations": [{"from": "human", "value": "<image>?"},
                                                            {"from": "gpt", "value": "a"}]},
        {"id": "c", "image": "img03.png", "conversations": [{"from": "human", "value": "<image>"},
                                                            {"from": "gpt", "value": "b"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "ok"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    config = PretokenizeConfig(data=str(tmp_path / "llava.json"), visual_tokenizer_path=str(tokenizer_dir),
                               output_dir=str(tmp_path / "cache"), data_format="llava", image_folder=str(image_folder),
                               batch_size=2, num_workers=0)
    info = run_pretokenize(config, show_progress=False)
    assert info["num_codes_written"] == 2
    cache = load_code_cache(tmp_path / "cache", tokenizer.config_hash())
    assert cache.keys() == ["img00.png", "img03.png"] and not cache.has_text


def test_build_mixture_from_code_cache_llava_and_text(tokenizer, image_folder, tmp_path, one_thread, qwen):
    from unimm.data.collator import UniMMCollator
    from unimm.data.mixture import MixtureConfig, build_mixture
    from unimm.data.tasks import SampleConfig, SampleFactory

    text_tokenizer, layout = qwen
    layout.codebook_spec = {"semantic": {"num_codes": 512, "depth": 1, "code_dim": 32}}
    records = read_image_records(image_folder).select(range(4))
    pretokenize(records, tokenizer, tmp_path / "cache", batch_size=4, shard_size=4, show_progress=False)
    finalize_code_cache(tmp_path / "cache", tokenizer)
    llava = [{"id": "v0", "image": "img01", "conversations": [{"from": "human", "value": "<image> colour?"},
                                                              {"from": "gpt", "value": "green"}]},
             {"id": "v1", "image": "unknown", "conversations": [{"from": "human", "value": "<image>"},
                                                                {"from": "gpt", "value": "x"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "text.txt").write_text("hello world\nthe quick brown fox\n")
    config = MixtureConfig(code_cache=str(tmp_path / "cache"), conversation_json=str(tmp_path / "llava.json"),
                           text_data=str(tmp_path / "text.txt"), caption_weight=1.0, t2i_weight=2.0,
                           conversation_weight=0.5, text_weight=0.5, num_samples=200, max_bad_fraction=0.5)
    factory = SampleFactory(text_tokenizer, layout, SampleConfig(uncond_prob=0.0))
    mixture = build_mixture(config, factory, tokenizer_hash=tokenizer.config_hash())
    tasks = [mixture.task_of(i) for i in range(len(mixture))]
    assert abs(tasks.count("t2i") / 200 - 0.5) < 0.1 and abs(tasks.count("caption") / 200 - 0.25) < 0.1
    samples = [mixture[i] for i in range(40)]
    assert [s.task for s in samples] == tasks[:40]
    t2i = next(s for s in samples if s.task == "t2i")
    cache = load_code_cache(tmp_path / "cache", tokenizer)
    (start, stop), = t2i.image_spans
    assert torch.equal(t2i.visual_codes["semantic"][start:stop], cache.codes_for(t2i.sample_id)["semantic"])
    conversations = [s for s in samples if s.task == "conversation"]
    assert conversations and all(s.sample_id == "v0" for s in conversations)  # v1's image is not in the cache
    tracker = mixture.datasets[mixture.names.index("conversation")].tracker
    assert tracker.summary()["bad_examples"][0][0] == "v1"
    batch = UniMMCollator(pad_token_id=text_tokenizer.pad_token_id)(samples[:8])
    assert batch["input_ids"].shape[0] == 8
    again = build_mixture(config, factory, tokenizer_hash=tokenizer.config_hash())
    assert [again[i].sample_id for i in range(40)] == [s.sample_id for s in samples]
    with pytest.raises(CodeCacheMismatchError):
        build_mixture(config, factory, tokenizer_hash="other")


def _other_weights(tokenizer):
    """The same config with other weights, as after a few more training steps."""
    import copy

    other = copy.deepcopy(tokenizer)
    with torch.no_grad():
        next(p for p in other.parameters() if p.requires_grad).add_(1e-3)
    return other


def test_cache_from_tokenizer_with_other_weights_is_refused(tokenizer, image_folder, tmp_path, one_thread, caplog):
    from unimm.tokenizer import load_tokenizer
    from unimm.tokenizer.identity import TokenizerIdentity, tokenizer_weights_hash, weights_hash_of_folder

    tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer_weights_hash(load_tokenizer(tmp_path / "tok")) == tokenizer_weights_hash(tokenizer)
    # What a ZeRO-3 run (parameters partitioned, empty on each rank) hashes instead: the saved files.
    assert weights_hash_of_folder(tmp_path / "tok") == tokenizer_weights_hash(tokenizer)
    assert weights_hash_of_folder(tmp_path) is None
    other = _other_weights(tokenizer)
    assert other.config_hash() == tokenizer.config_hash()
    assert tokenizer_weights_hash(other) != tokenizer_weights_hash(tokenizer)

    out = tmp_path / "cache"
    pretokenize(read_image_records(image_folder).select(range(4)), tokenizer, out, batch_size=4, shard_size=4,
                show_progress=False)
    info = finalize_code_cache(out, tokenizer)
    assert info["tokenizer_weights_hash"] == tokenizer_weights_hash(tokenizer)
    assert len(load_code_cache(out, tokenizer)) == 4
    with pytest.raises(CodeCacheMismatchError) as err:
        load_code_cache(out, TokenizerIdentity.of(other))
    message = str(err.value)
    assert tokenizer_weights_hash(tokenizer) in message and tokenizer_weights_hash(other) in message
    assert str(out) in message and "allow_tokenizer_weights_mismatch" in message
    with caplog.at_level("WARNING", logger="unimm.data.code_cache"):
        assert len(load_code_cache(out, other, allow_weights_mismatch=True)) == 4
    assert tokenizer_weights_hash(other) in caplog.text
    # A pretokenize resumed with other weights into the same directory is refused too.
    with pytest.raises(CodeCacheMismatchError, match="pretokenize run started with"):
        pretokenize(read_image_records(image_folder).select(range(4)), other, out, batch_size=4, shard_size=4,
                    show_progress=False)


def test_damaged_shards_are_named_and_only_they_are_re_encoded(tokenizer, image_folder, tmp_path, one_thread):
    from unimm.data.code_cache import CodeCacheCorruptError
    from unimm.data.pretokenize import rebuild_command

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    out = tmp_path / "cache"
    config = PretokenizeConfig(data=str(image_folder), visual_tokenizer_path=str(tokenizer_dir), output_dir=str(out),
                               batch_size=4, shard_size=4, num_workers=0)
    info = run_pretokenize(config, show_progress=False)
    assert info["rebuild_command"] == rebuild_command(config) and "scripts/pretokenize.py" in info["rebuild_command"]
    assert set(info["shard_checksums"]) == {"shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"}
    original = _shard_bytes(out)

    flipped = out / "shard-00001.arrow"
    data = bytearray(flipped.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):  # same size: only the checksum can tell
        data[i] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CodeCacheCorruptError) as err:
        load_code_cache(out, tokenizer)
    assert str(flipped) in str(err.value) and "checksum" in str(err.value)
    assert info["rebuild_command"] in str(err.value)

    truncated = out / "shard-00000.arrow"
    truncated.write_bytes(original["shard-00000.arrow"][: len(original["shard-00000.arrow"]) // 2])
    with pytest.raises(CodeCacheCorruptError, match=r"shard-00000\.arrow is unusable: it is \d+ bytes"):
        load_code_cache(out, tokenizer)
    (out / "shard-00002.arrow").unlink()
    with pytest.raises(CodeCacheCorruptError, match=r"shard-00000\.arrow"):
        load_code_cache(out, tokenizer, verify=False)  # unchecked, opening the torn file still fails by name

    # The same pretokenize run on the same directory re-encodes exactly the damaged shards.
    result = pretokenize(read_image_records(image_folder), tokenizer, out, batch_size=4, shard_size=4,
                         source=str(image_folder), show_progress=False)
    assert result.written_shards == [0, 1, 2] and result.skipped_shards == []
    (out / "shard-00002.arrow").write_bytes(original["shard-00002.arrow"])
    flipped.write_bytes(bytes(data))
    result = pretokenize(read_image_records(image_folder), tokenizer, out, batch_size=4, shard_size=4,
                         source=str(image_folder), show_progress=False)
    assert result.written_shards == [1] and result.skipped_shards == [0, 2]
    finalize_code_cache(out, tokenizer, rebuild_command=info["rebuild_command"])
    assert _shard_bytes(out) == original
    assert len(load_code_cache(out, tokenizer)) == 10


def test_cache_of_an_older_format_is_refused_by_name(tokenizer, image_folder, tmp_path, one_thread):
    out = tmp_path / "cache"
    pretokenize(read_image_records(image_folder).select(range(2)), tokenizer, out, batch_size=2, shard_size=4,
                show_progress=False)
    info = finalize_code_cache(out, tokenizer)
    (out / "cache_info.json").write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(CodeCacheMismatchError, match=r"format version 1.*rebuild it"):
        load_code_cache(out, tokenizer)
    (out / "cache_info.json").write_text('{"format_version": 2,')
    from unimm.data.code_cache import CodeCacheCorruptError

    with pytest.raises(CodeCacheCorruptError, match=r"cache_info\.json: not valid JSON \(line 1, column"):
        load_code_cache(out, tokenizer)


def test_pretokenize_killed_twice_finishes_with_identical_shards(tokenizer, image_folder, tmp_path, one_thread):
    records = read_image_records(image_folder)
    straight = tmp_path / "straight"
    pretokenize(records, tokenizer, straight, batch_size=2, shard_size=4, show_progress=False)
    finalize_code_cache(straight, tokenizer)
    killed = tmp_path / "killed"
    for calls in (1, 4):  # dies inside shard 0, then (resumed) inside shard 2
        with pytest.raises(_Interrupted):
            pretokenize(records, _FailingTokenizer(tokenizer, calls=calls), killed, batch_size=2, shard_size=4,
                        show_progress=False)
    assert sorted(p.name for p in killed.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    result = pretokenize(records, tokenizer, killed, batch_size=2, shard_size=4, show_progress=False)
    assert result.skipped_shards == [0, 1] and result.written_shards == [2]
    finalize_code_cache(killed, tokenizer)
    assert _shard_bytes(killed) == _shard_bytes(straight)
    assert (killed / "cache_info.json").read_bytes() == (straight / "cache_info.json").read_bytes()
