"""Shard sources read as streams: webdataset tars, Parquet (and its on-the-fly encoding into codes) and LLaVA
JSON/JSONL through a record index built once; each skips to a record offset, and bad records are skipped, counted
and named by file and record."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unimm.data.bad_samples import TooManyBadSamplesError
from unimm.data.shards import (
    POSITION,
    LlavaJsonShards,
    ParquetShards,
    ShardSource,
    WebDatasetShards,
    encode,
    record_index,
)
from unimm.data.sources import read_llava_json
from unimm.utils.errors import InputFileError


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + i, 20), (30 * i % 256, 90, 200 - 20 * i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_group_members_skip_to_an_offset_and_count_bad_samples(tmp_path):
    _tar(tmp_path / "a-000.tar", [
        ("part/s0", {"png": _png(0), "txt": b"zero"}),
        ("part/s1", {"jpg": b"\xff\xd8\xff not a jpeg", "txt": b"one"}),
        ("part/s2", {"png": _png(2), "json": json.dumps({"caption": "two", "w": 26}).encode()}),
        ("part/s3", {"txt": b"no image"}),
        ("part/s4", {"png": _png(4), "txt": "vier \u00fc".encode()}),
    ])
    _tar(tmp_path / "a-001.tar", [("s5", {"png": _png(5), "txt": b"five"})])
    source = WebDatasetShards(str(tmp_path / "a-*.tar"), max_bad_fraction=0.5)
    assert isinstance(source, ShardSource) and source.shards() == [str(tmp_path / "a-000.tar"),
                                                                    str(tmp_path / "a-001.tar")]
    records = list(source.read(source.shards()[0]))
    assert [(r["id"], r["text"], r[POSITION]) for r in records] == [
        ("part/s0", "zero", 0), ("part/s2", "two", 2), ("part/s4", "vier \u00fc", 4)]
    assert records[1]["image"].size == (26, 20) and records[1]["json"]["w"] == 26
    assert source.tracker.num_bad == 2 and source.tracker.num_ok == 3
    bad = dict(source.tracker.bad_examples)
    assert "cannot decode image" in bad[f"{source.shards()[0]}:part/s1"]
    assert "no image member" in bad[f"{source.shards()[0]}:part/s3"]
    assert [r["id"] for r in source.read(source.shards()[0], start=4)] == ["part/s4"]
    assert [r["id"] for r in source.read(source.shards()[1])] == ["s5"]

    torn = tmp_path / "torn.tar"
    for cut in (600, 1300):  # inside the first member's bytes, inside the second member's header
        torn.write_bytes((tmp_path / "a-000.tar").read_bytes()[:cut])
        with pytest.raises(InputFileError, match=r"torn\.tar: cannot read the tar shard after sample"):
            list(WebDatasetShards(torn).read(str(torn)))
    with pytest.raises(FileNotFoundError, match="no webdataset files"):
        WebDatasetShards(tmp_path / "nothing-*.tar")


def _parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def test_parquet_shards_count_from_metadata_and_skip_row_groups(tmp_path):
    rows = [{"id": f"p{i}", "image": _png(i), "caption": f"cap {i}"} for i in range(7)]
    rows[3]["image"] = b"garbage"
    _parquet(tmp_path / "x.parquet", rows, row_group_size=3)
    (tmp_path / "img.png").write_bytes(_png(9))
    _parquet(tmp_path / "paths.parquet", [{"image": "img.png", "text": "by path"}], row_group_size=1)
    source = ParquetShards([tmp_path / "x.parquet", tmp_path / "paths.parquet"], max_bad_fraction=0.5)
    x, paths = source.shards()
    assert source.num_records(x) == 7 and source.num_records(paths) == 1
    records = list(source.read(x))
    assert [(r["id"], r["text"], r[POSITION]) for r in records] == [
        (f"p{i}", f"cap {i}", i) for i in (0, 1, 2, 4, 5, 6)]
    assert records[4]["image"].size == (29, 20)
    assert source.tracker.bad_examples[0][0] == f"{x}:p3"
    assert [(r["id"], r[POSITION]) for r in source.read(x, start=5)] == [("p5", 5), ("p6", 6)]
    (by_path,) = source.read(paths)
    assert by_path["id"] == "paths-0" and by_path["text"] == "by path" and by_path["image"].size == (33, 20)
    structs = [{"image": {"bytes": _png(3), "path": None}, "txt": "bytes"}, {"image": {"bytes": None, "path": "img.png"},
                                                                            "txt": "path"}]
    _parquet(tmp_path / "hf.parquet", structs, row_group_size=2)  # a `datasets.Image` column
    hf = ParquetShards(tmp_path / "hf.parquet")
    assert [(r["text"], r["image"].size) for r in hf.read(hf.shards()[0])] == [("bytes", (27, 20)), ("path", (33, 20))]
    with pytest.raises(InputFileError, match=r"x\.parquet: no image column 'picture'; columns are"):
        next(ParquetShards(tmp_path / "x.parquet", image_key="picture").read(x))


def test_encoding_parquet_images_on_the_fly_gives_the_tokenizers_codes(tmp_path, one_thread):
    from unimm.data.images import ImageTransform, load_image
    from unimm.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer("vqrae-tiny").eval()
    rows = [{"id": f"p{i}", "image": _png(i), "text": f"t{i}"} for i in range(5)]
    _parquet(tmp_path / "x.parquet", rows, row_group_size=2)
    source = encode(ParquetShards(tmp_path / "x.parquet"), tokenizer, batch_size=2)
    assert isinstance(source, ShardSource) and source.num_records(source.shards()[0]) == 5
    records = list(source.read(source.shards()[0], start=1))
    transform = ImageTransform.for_tokenizer(tokenizer)
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([transform(load_image(r["image"], r["id"])) for r in rows[1:]]))
    assert [(r["id"], r["text"], r[POSITION]) for r in records] == [(f"p{i}", f"t{i}", i) for i in range(1, 5)]
    assert all("image" not in r for r in records)
    for i, record in enumerate(records):
        assert record["codes"]["semantic"].dtype == np.int16
        assert np.array_equal(record["codes"]["semantic"], expected["semantic"][i].numpy())


LLAVA = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it? \u00e9"},
                                                    {"from": "gpt", "value": "A \"quoted\" thing, [1, 2]."}]},
    {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "c", "image": ["x.png", "y.png"], "conversations": [{"from": "human", "value": "<image><image>"},
                                                               {"from": "gpt", "value": "two {images}"}]},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_files_are_read_lazily_through_an_index_built_once(tmp_path, suffix):
    records = [{**LLAVA[i % 3], "id": f"r{i}"} for i in range(11)]
    path = tmp_path / f"conv{suffix}"
    if suffix == ".json":
        path.write_text("[\n  " + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    source = LlavaJsonShards(path, records_per_shard=4)
    assert source.shards() == [f"{path}#0", f"{path}#1", f"{path}#2"]
    assert [source.num_records(s) for s in source.shards()] == [4, 4, 3]
    read = [r for s in source.shards() for r in source.read(s)]
    assert [r["id"] for r in read] == list(read_llava_json(path)["id"])
    assert [{k: v for k, v in r.items() if k != POSITION} for r in read] == records
    assert [(r["id"], r[POSITION]) for r in source.read(f"{path}#1", start=2)] == [("r6", 2), ("r7", 3)]
    normalised = LlavaJsonShards(path, records_per_shard=4, normalise=True)
    columns = read_llava_json(path).to_list()
    assert [{k: v for k, v in r.items() if k != POSITION} for s in normalised.shards()
            for r in normalised.read(s)] == columns

    index_file = Path(f"{path}.index.bin")
    built = index_file.stat().st_mtime_ns
    assert len(LlavaJsonShards(path).index[str(path)]) == 11 and index_file.stat().st_mtime_ns == built  # reused
    index_file.write_bytes(index_file.read_bytes()[:24])  # torn: rebuilt
    assert record_index(path).tolist() == LlavaJsonShards(path).index[str(path)].tolist() and len(record_index(path)) == 11
    more = records + [{**LLAVA[1], "id": "r11"}]
    path.write_text(json.dumps(more) if suffix == ".json" else "\n".join(json.dumps(r) for r in more))
    assert len(record_index(path)) == 12  # the file changed: rebuilt


def test_llava_bad_records_are_counted_by_file_and_record_and_broken_lists_named(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_bytes(b'{"id": "a", "conversations": []}\n{"id": "b", oops}\n[1, 2]\n\xff\xfe\n{"id": "e"}\n')
    source = LlavaJsonShards(path, max_bad_fraction=0.9)
    assert [(r["id"], r[POSITION]) for r in source.read(source.shards()[0])] == [("a", 0), ("e", 4)]
    reasons = dict(source.tracker.bad_examples)
    assert reasons[f"{path}: record 1 (byte 33)"].startswith("invalid JSON")
    assert reasons[f"{path}: record 2 (byte 51)"] == "a list, not a JSON object"
    assert reasons[f"{path}: record 3 (byte 58)"] == "not UTF-8 (byte 0xff)"
    normalised = LlavaJsonShards(path, normalise=True)
    marked = [(r["id"], r["malformed"], r[POSITION]) for r in normalised.read(normalised.shards()[0])]
    assert [(sample_id, position) for sample_id, _, position in marked] == [
        ("a", 0), ("conv-1", 1), ("conv-2", 2), ("conv-3", 3), ("e", 4)]
    assert marked[0][1] is None and marked[2][1] == f"{path}: record 2 (byte 51): a list, not a JSON object"
    assert marked[1][1].startswith(f"{path}: record 1 (byte 33): invalid JSON") and normalised.tracker.num_seen == 0
    with pytest.raises(TooManyBadSamplesError, match="conv.jsonl: record 1"):
        strict = LlavaJsonShards(path, max_bad_fraction=0.0)
        list(strict.read(strict.shards()[0]))

    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a"}, {"id": "b"} {"id": "c"}]')
    with pytest.raises(InputFileError, match=r"broken\.json: invalid JSON list at byte 26 \(record 2\)"):
        LlavaJsonShards(broken)
    broken.write_text('{"id": "a"}')
    with pytest.raises(InputFileError, match="must hold a list of records"):
        LlavaJsonShards(broken)


def test_llava_index_can_live_in_a_cache_folder_instead_of_beside_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "conv.json"
    path.write_text(json.dumps(LLAVA))
    source = LlavaJsonShards(path, index_dir=tmp_path / "index")
    assert list(data.iterdir()) == [path] and len(list((tmp_path / "index").glob("conv.json.*.index.bin"))) == 1
    assert [r["id"] for r in source.read(source.shards()[0])] == ["a", "b", "c"]
