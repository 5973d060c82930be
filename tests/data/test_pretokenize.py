"""Code-cache format 3 and the pretokenize program: codes in the smallest integer type of their codebook (format 2
int32 caches still read), code caches read as shard streams, and parallel pretokenize whose manifest is written
from the shard records of every rank, also when each node keeps its shards on its own disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from unimm.data.code_cache import (
    CodeCacheCorruptError,
    CodeCacheMismatchError,
    code_dtype,
    finalize_code_cache,
    load_code_cache,
    write_code_cache,
)
from unimm.data.images import read_image_records
from unimm.data.pretokenize import pretokenize
from unimm.data.shards import POSITION, CodeCacheShards, ShardSource

REPO = Path(__file__).resolve().parents[2]
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "code_cache_v2"  # written by the format-2 writer (int32 codes)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for i in range(10):
        image = Image.new("RGB", (40, 32), (25 * i, 200 - 15 * i, 40 + 20 * (i % 3)))
        image.paste((255, 255, 255), (4 * (i % 6), 3, 4 * (i % 6) + 10, 13))
        image.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"shape {i}")
    return folder


def _shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard-*"))}


def _codes_column_type(path: Path, group: str) -> pa.DataType:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).schema.field(f"codes_{group}").type.value_type


def test_code_dtype_is_the_smallest_that_holds_the_codebook():
    assert [code_dtype(n).name for n in (2, 256, 257, 16384, 32768, 32769, 1 << 20, None)] == [
        "uint8", "uint8", "int16", "int16", "int16", "int32", "int32", "int32"]


def test_codes_are_stored_in_the_smallest_type_and_read_back_exactly(tmp_path, one_thread):
    from unimm.tokenizer import build_tokenizer

    rng = np.random.default_rng(0)
    for preset, num_codes, dtype in (("vqrae-tiny", 16384, pa.int16()), ("dualtoken-tiny", None, pa.uint8())):
        tok = build_tokenizer(preset, **({"num_codes": num_codes} if num_codes else {}))
        spec = {name: group.to_dict() for name, group in tok.codebook_spec.items()}
        codes = {name: rng.integers(0, group["num_codes"], (5, tok.num_positions, group["depth"]))
                 for name, group in spec.items()}
        out = tmp_path / preset
        info = write_code_cache(out, tok, [f"r{i}" for i in range(5)], codes, shard_size=2)
        assert info["format_version"] == 3 and set(info["code_dtypes"].values()) == {str(dtype)}
        assert info["shard_num_records"] == {"shard-00000.arrow": 2, "shard-00001.arrow": 2, "shard-00002.arrow": 1}
        assert all(_codes_column_type(out / "shard-00000.arrow", name) == dtype for name in spec)
        cache = load_code_cache(out, tok)
        for i in range(5):
            for name in spec:
                assert cache[i]["codes"][name].dtype == torch.long
                assert torch.equal(cache[i]["codes"][name], torch.from_numpy(codes[name][i]))
    # 16384 codes at DualToken-384's shape (729 positions, 2 groups of depth 8): half the int32 bytes.
    assert code_dtype(16384).itemsize * 729 * 8 * 2 == 23328

    too_big = {"semantic": np.full((1, 64, 1), 16384)}
    with pytest.raises(ValueError, match=r"outside its codebook of 16384 codes"):
        write_code_cache(tmp_path / "bad", build_tokenizer("vqrae-tiny", num_codes=16384), ["x"], too_big)


def test_a_format_2_int32_cache_still_reads(tokenizer, image_folder, tmp_path):
    expected = {i: ((7 * i + np.arange(64)) % 512).reshape(64, 1) for i in range(5)}
    cache = load_code_cache(FIXTURE_V2, None)
    assert _codes_column_type(FIXTURE_V2 / "shard-00000.arrow", "semantic") == pa.int32()
    assert len(cache) == 5 and cache[3]["text"] == "caption 3"
    assert all(torch.equal(cache[i]["codes"]["semantic"], torch.from_numpy(expected[i])) for i in range(5))
    stream = CodeCacheShards(FIXTURE_V2)
    assert stream.has_text and stream.image_positions == 64
    assert stream.num_records("shard-00001.arrow") is None  # format 2 manifests have no per-shard counts
    records = [r for shard in stream.shards() for r in stream.read(shard)]
    assert [r["id"] for r in records] == [f"img{i}" for i in range(5)]
    assert all(np.array_equal(r["codes"]["semantic"], expected[i]) for i, r in enumerate(records))
    # A format-2 pretokenize left unfinished cannot be resumed by this writer: the two formats would mix.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "pretokenize_state.json").write_text((FIXTURE_V2 / "pretokenize_state.json").read_text())
    with pytest.raises(CodeCacheMismatchError, match=r"cache format 2 \(int32 codes\).*new output_dir"):
        pretokenize(read_image_records(image_folder), tokenizer, partial, show_progress=False)


def test_code_cache_shards_stream_from_an_offset_and_verify_each_shard_when_read(tokenizer, image_folder, tmp_path,
                                                                                 one_thread):
    out = tmp_path / "cache"
    pretokenize(read_image_records(image_folder), tokenizer, out, batch_size=4, shard_size=4, show_progress=False)
    finalize_code_cache(out, tokenizer)
    cache = load_code_cache(out, tokenizer)
    stream = CodeCacheShards(out, expected=tokenizer)
    assert isinstance(stream, ShardSource)
    assert stream.shards() == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert [stream.num_records(s) for s in stream.shards()] == [4, 4, 2]
    records = [r for s in stream.shards() for r in stream.read(s)]
    assert [r["id"] for r in records] == cache.keys() and [r["text"] for r in records][7] == "shape 7"
    for i, record in enumerate(records):
        assert record["codes"]["semantic"].dtype == np.int16 and record[POSITION] == i % 4
        assert torch.equal(torch.from_numpy(record["codes"]["semantic"]).long(), cache[i]["codes"]["semantic"])
    (tail,) = list(stream.read("shard-00001.arrow", start=3))
    stream.slice_rows = 3  # records decoded 3 at a time: the same records and positions across slice ends
    assert [(r["id"], r[POSITION]) for r in stream.read("shard-00001.arrow", start=1)] == [
        (f"img0{i}", i - 4) for i in (5, 6, 7)]
    assert [r["id"] for s in stream.shards() for r in stream.read(s)] == cache.keys()
    assert tail["id"] == "img07" and tail[POSITION] == 3
    assert list(stream.read("shard-00002.arrow", start=2)) == []

    data = bytearray((out / "shard-00002.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "shard-00002.arrow").write_bytes(bytes(data))
    fresh = CodeCacheShards(out, expected=tokenizer)  # listing and the other shards need no checksum of shard 2
    assert len(list(fresh.read("shard-00000.arrow"))) == 4
    with pytest.raises(CodeCacheCorruptError, match=r"shard-00002\.arrow is unusable: its xxh3_128 checksum"):
        next(fresh.read("shard-00002.arrow"))
    with pytest.raises(CodeCacheMismatchError, match="config hash"):
        CodeCacheShards(out, expected="0123abcd")


def test_nodes_without_a_shared_disk_each_get_the_whole_manifest(tokenizer, image_folder, tmp_path, one_thread):
    """Two 'nodes' write into different folders (their local disks); the manifest each writes, from the shard
    records gathered over the process group, lists every shard, and each node reads its own."""
    records = read_image_records(image_folder)
    single = tmp_path / "single"
    pretokenize(records, tokenizer, single, batch_size=4, shard_size=4, show_progress=False)
    expected = finalize_code_cache(single, tokenizer)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    results = [pretokenize(records, tokenizer, nodes[rank], batch_size=4, shard_size=4, process_index=rank,
                           num_processes=2, show_progress=False) for rank in (0, 1)]
    gathered = [record for result in results for record in result.shard_records]
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[1\] are not finished"):
        finalize_code_cache(nodes[0], tokenizer)  # from its own disk alone, node 0 sees shards 0 and 2 only
    manifests = [finalize_code_cache(node, tokenizer, shard_records=gathered) for node in nodes]
    assert manifests[0] == manifests[1] == expected
    assert sorted(_shard_bytes(nodes[0])) == ["shard-00000.arrow", "shard-00000.json", "shard-00002.arrow",
                                              "shard-00002.json"]
    streams = [CodeCacheShards(node, expected=tokenizer) for node in nodes]
    mine = {s: [r["id"] for r in streams[i % 2].read(s)] for i, s in enumerate(streams[0].shards())}
    assert [key for s in streams[0].shards() for key in mine[s]] == load_code_cache(single, tokenizer).keys()
    with pytest.raises(CodeCacheCorruptError, match=r"node0/shard-00001\.arrow is unusable: the file is missing"):
        next(streams[0].read("shard-00001.arrow"))


def test_two_ranks_under_torchrun_write_the_same_cache_as_one_process(tokenizer, image_folder, tmp_path, one_thread):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "cache"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "scripts/pretokenize.py", "--data", str(image_folder), "--tokenizer_path", str(tmp_path / "tokenizer"),
               "--output_dir", str(out), "--shard_size", "3", "--batch_size", "3", "--num_workers", "0"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'tokenizer_path' is deprecated; use 'visual_tokenizer_path'" in proc.stderr
    info = json.loads((out / "cache_info.json").read_text())
    assert info["shard_num_records"] == {f"shard-0000{s}.arrow": 3 if s < 3 else 1 for s in range(4)}
    assert "--visual_tokenizer_path" in info["rebuild_command"]
    single = tmp_path / "single"
    pretokenize(read_image_records(image_folder), tokenizer, single, batch_size=3, shard_size=3,
                source=str(image_folder), show_progress=False)
    assert _shard_bytes(out) == _shard_bytes(single)
    assert len(load_code_cache(out, tokenizer)) == 10


def test_sharded_input_each_rank_encodes_only_its_own_files(tokenizer, tmp_path, one_thread):
    """Webdataset tars listed by a brace range: input tar i becomes cache shard i, written by rank i % 2, which
    never opens the other rank's tars (deleted from its 'node' here); bad images are listed in their shard."""
    import io
    import tarfile

    from unimm.data.images import ImageTransform, load_image
    from unimm.data.pretokenize import PretokenizeConfig, pretokenize_shards, run_pretokenize
    from unimm.data.shards import WebDatasetShards

    images = {}
    for t in range(3):
        with tarfile.open(tmp_path / f"in-{t:03d}.tar", "w") as tar:
            for k in range(3):
                key = f"t{t}k{k}"
                buffer = io.BytesIO()
                Image.new("RGB", (36, 30), (60 * t + 10 * k, 100, 200 - 40 * k)).save(buffer, format="PNG")
                data = b"broken" if (t, k) == (2, 1) else buffer.getvalue()
                images[key] = data
                for extension, payload in (("png", data), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    pattern = str(tmp_path / "in-{000..002}.tar")
    gathered = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        for t in range(3):  # this node's disk holds only its own input tars
            if t % 2 == rank:
                (node / f"in-{t:03d}.tar").write_bytes((tmp_path / f"in-{t:03d}.tar").read_bytes())
        source = WebDatasetShards(str(node / "in-{000..002}.tar"), max_bad_fraction=0.5)
        result = pretokenize_shards(source, tokenizer, node / "cache", batch_size=2, process_index=rank,
                                    num_processes=2, max_bad_fraction=0.5, show_progress=False)
        assert result.written_shards == [t for t in range(3) if t % 2 == rank] and result.num_shards == 3
        gathered += result.shard_records
    info = finalize_code_cache(tmp_path / "node0" / "cache", tokenizer, max_bad_fraction=0.5, shard_records=gathered)
    assert info["shard_num_records"] == {"shard-00000.arrow": 3, "shard-00001.arrow": 3, "shard-00002.arrow": 2}
    assert info["num_records"] == 9 and [s[0] for s in info["skipped"]] == [f"{tmp_path}/node0/in-002.tar:t2k1"]
    stream = CodeCacheShards(tmp_path / "node0" / "cache", expected=tokenizer)
    records = list(stream.read("shard-00002.arrow"))
    assert [(r["id"], r["text"]) for r in records] == [("t2k0", "caption t2k0"), ("t2k2", "caption t2k2")]
    transform = ImageTransform.for_tokenizer(tokenizer)
    with torch.no_grad():
        expected = tokenizer.encode(torch.stack([transform(load_image(images[r["id"]], r["id"])) for r in records]))
    assert all(np.array_equal(r["codes"]["semantic"], expected["semantic"][i].numpy()) for i, r in enumerate(records))
    again = pretokenize_shards(WebDatasetShards(str(tmp_path / "node0" / "in-{000..002}.tar")), tokenizer,
                               tmp_path / "node0" / "cache", process_index=0, num_processes=2, show_progress=False)
    assert again.written_shards == [] and again.skipped_shards == [0, 2]

    # The program, one process, all tars on its disk: the same codes as the two nodes together.
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = PretokenizeConfig(data=pattern, visual_tokenizer_path=str(tmp_path / "tokenizer"), input_shards=True,
                               output_dir=str(tmp_path / "single"), batch_size=4, max_bad_fraction=0.5)
    single = run_pretokenize(config, show_progress=False)
    assert "--input_shards true" in single["rebuild_command"] and single["shard_num_records"] == \
        info["shard_num_records"]
    cache = load_code_cache(tmp_path / "single", tokenizer)
    assert len(cache) == 8 and torch.equal(cache.codes_for("t2k2")["semantic"],
                                           torch.from_numpy(records[1]["codes"]["semantic"]).long())


def test_the_pretokenize_names_still_import_from_code_cache():
    import unimm.data.code_cache as code_cache
    import unimm.data.pretokenize as program

    for name in ("PretokenizeConfig", "pretokenize", "run_pretokenize", "llava_image_records", "rebuild_command"):
        assert getattr(code_cache, name) is getattr(program, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        code_cache.nothing  # noqa: B018
