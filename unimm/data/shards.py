"""Sharded sources read as streams: what a streaming data path reads at any scale without loading a dataset whole.

Every source implements `ShardSource`: a stable, ordered list of shard ids (the same on every rank, so ranks and
dataloader workers can split them), each shard's record count when it is known without reading it, and `read`,
which yields the records of one shard from a record offset on, skipping the records before it cheaply (no image
is decoded, no code copied):

- `CodeCacheShards`: a code cache's Arrow shards (`unimm.data.code_cache`), memory-mapped; record counts and
  checksums come from its manifest, and each shard is checked against its checksum when this process first
  reads it (a rank verifies its own shards, not the whole cache);
- `WebDatasetShards`: webdataset `.tar` shards (members grouped by key: an image, `txt` and/or `json`), read
  sequentially with the standard library's `tarfile`;
- `ParquetShards`: Parquet files with image bytes (or paths) and text columns, read row group by row group;
- `LlavaJsonShards`: LLaVA JSON lists or JSONL files read lazily through a record offset index built once
  (a JSONL file's line offsets, a JSON list's top-level element offsets) and kept beside the file (or in
  `index_dir`), split into shards of `records_per_shard` records;
- `encode(source, tokenizer)`: image records `{"id", "image", "text"}` of a webdataset or Parquet source turned
  into code records `{"id", "text", "codes"}` by a visual tokenizer, in batches: runs without a code cache.

Records are plain dicts: code records `{"id", "text"?, "codes": {group: np.ndarray [N, D]}}`, image records
`{"id", "image": PIL.Image, "text"}`, LLaVA records as written in the file. Every record carries its position in
its shard under `POSITION` (bad records included in the count), so a consumer that stops after a record resumes
with `read(shard, record[POSITION] + 1)`. Bad records (an image that does not decode, a line that is not JSON) are
skipped, counted by the source's `tracker` (`BadSampleTracker`, which stops the run past `max_bad_fraction`) and
named by file and record; a file that cannot be read at all is an error naming it.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.code_cache import (
    CodeCacheCorruptError,
    check_identity,
    code_dtype,
    codebook_spec_dict,
    read_cache_info,
    rebuild_hint,
    shard_problem,
)
from unimm.data.images import IMAGE_EXTENSIONS, TEXT_KEYS, ImageLoadError, load_image
from unimm.utils.errors import InputFileError

logger = logging.getLogger(__name__)

POSITION = "shard_position"  # a record's index in its shard, bad records counted: resume at record[POSITION] + 1


@runtime_checkable
class ShardSource(Protocol):
    name: str  # for errors and state keys

    def shards(self) -> list[str]:
        """Stable, ordered shard ids (files), the same on every rank."""

    def num_records(self, shard: str) -> int | None:
        """Records in `shard` (bad ones included), or None when unknown without reading it."""

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        """The records of `shard` from index `start` on (the records before it are skipped cheaply)."""


_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _brace_range(pattern: str) -> list[str]:
    """`shards-{00000..00099}.tar` -> the 100 names (webdataset's notation; zero padding as written)."""
    match = _BRACE_RANGE.search(pattern)
    if match is None:
        return [pattern]
    low, high = match.group(1), match.group(2)
    width = len(low) if low.startswith("0") else 0
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for i in range(int(low), int(high) + 1) for name in _brace_range(f"{head}{i:0{width}d}{tail}")]


def is_index_file(name: str) -> bool:
    """Whether `name` is a record index that `record_index` writes beside a data file (`<file>.index.json`, which
    a folder listing of `.json` data files must not take for data)."""
    return name.lower().endswith((".index.json", ".index.bin")) or ".index.bin." in name or ".index.json." in name


def expand_files(files: str | os.PathLike | Sequence[str | os.PathLike], suffixes: tuple[str, ...],
                 what: str) -> list[str]:
    """Files from a path, a glob, a folder (its files ending in `suffixes`, sorted), a brace range
    (`shards-{00000..00099}.tar`) or a list of those. A brace range is taken as written, whether or not its files
    are on this node: each node of a run without a shared filesystem lists every shard and holds only its own."""
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    found: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _BRACE_RANGE.search(item):
            found.extend(_brace_range(item))
            continue
        if Path(item).is_dir():
            matched = sorted(str(p) for p in Path(item).iterdir()
                             if p.name.lower().endswith(suffixes) and not is_index_file(p.name))
        elif any(ch in item for ch in "*?["):
            matched = sorted(globlib.glob(item))
        else:
            matched = [item] if Path(item).is_file() else []
        if not matched:
            raise FileNotFoundError(f"no {what} files ({', '.join(suffixes)}) at {item}")
        found.extend(matched)
    return found


# ------------------------------------------------------------------------------------------------ code caches


class CodeCacheShards:
    """A finished code cache as a stream of code records, one Arrow shard at a time (memory-mapped).

    `expected` (the training tokenizer, its `TokenizerIdentity` or a config hash) is checked against the manifest
    as `load_code_cache` does. With `verify`, each shard's size and checksum are checked the first time this
    process reads it. A shard that is not on this node's disk (a multi-node pretokenize without a shared
    filesystem keeps each node's shards local) is an error naming it when read, not when listed."""

    def __init__(self, path: str | os.PathLike, expected: Any | None = None, allow_weights_mismatch: bool = False,
                 verify: bool = True, name: str | None = None):
        self.path = Path(path)
        self.info = read_cache_info(self.path)
        if expected is not None:
            check_identity(self.path, self.info, expected, allow_weights_mismatch)
        self.name = name or f"code_cache:{self.path}"
        self.verify = verify
        self.shapes = {group: tuple(shape) for group, shape in self.info["shapes"].items()}
        self._counts = self.info.get("shard_num_records") or {}  # absent in format 2 manifests
        self._verified: set[str] = set()
        self.slice_rows = 256

    def shards(self) -> list[str]:
        return list(self.info["shards"])

    def num_records(self, shard: str) -> int | None:
        return self._counts.get(shard)

    @property
    def image_positions(self) -> int:
        """LLM positions of one cached image: N of the codes' [N, D] shape."""
        return int(next(iter(self.shapes.values()))[0]) if self.shapes else 0

    @property
    def has_text(self) -> bool:
        """Whether records carry captions: the schema of the first shard file on this node's disk."""
        for shard in self.shards():
            if (self.path / shard).is_file():
                with pa.memory_map(str(self.path / shard)) as source:
                    return "text" in pa.ipc.open_stream(source).schema.names
        raise FileNotFoundError(f"code cache {self.path}: none of its {len(self.shards())} shard files is on this "
                                f"node's disk")

    def _open(self, shard: str) -> Any:
        if shard not in self.info["shard_checksums"]:
            raise KeyError(f"{shard!r} is not a shard of the code cache {self.path}")
        file = self.path / shard
        if self.verify and shard not in self._verified:
            problem = shard_problem(file, self.info["shard_checksums"][shard])
            if problem is not None:
                raise CodeCacheCorruptError(f"code cache shard {file} is unusable: {problem}; "
                                            f"{rebuild_hint(self.path, self.info)}")
            self._verified.add(shard)
        try:
            return pa.ipc.open_stream(pa.memory_map(str(file)))
        except (OSError, pa.ArrowException) as err:
            raise CodeCacheCorruptError(f"code cache shard {file} cannot be read ({err}); "
                                        f"{rebuild_hint(self.path, self.info)}") from None

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        reader = self._open(shard)
        position = 0
        for batch in reader:
            if position + batch.num_rows <= start:  # skipped whole: nothing is decoded
                position += batch.num_rows
                continue
            # Decoded a slice at a time: a reader that stops after a few records converts no more than that.
            for first in range(max(0, start - position), batch.num_rows, self.slice_rows):
                part = batch.slice(first, self.slice_rows)
                ids = part.column("id").to_pylist()
                texts = part.column("text").to_pylist() if "text" in part.schema.names else None
                codes = {group: part.column(f"codes_{group}").flatten().to_numpy().reshape(part.num_rows, *shape)
                         for group, shape in self.shapes.items()}
                for i, sample_id in enumerate(ids):
                    record = {"id": sample_id, "codes": {group: codes[group][i].copy() for group in codes},
                              POSITION: position + first + i}
                    if texts is not None:
                        record["text"] = texts[i]
                    yield record
            position += batch.num_rows


# ------------------------------------------------------------------------------------------ image-text shards


def _pick_text(fields: dict, text_key: str | None) -> str | None:
    for key in (text_key,) if text_key else TEXT_KEYS:
        value = fields.get(key)
        if isinstance(value, str):
            return value
    return None


class WebDatasetShards:
    """Webdataset `.tar` shards as image records: consecutive members with the same key (the member path up to
    the first dot of its file name) form one sample; its first image member is the image, `txt` (or a `text_key`
    / `text` / `caption` field of its `json` member) the text. A sample without a decodable image is skipped and
    counted; a tar file that cannot be read is an error naming it and the sample it stopped at."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], text_key: str | None = None,
                 max_bad_fraction: float = 0.01, name: str | None = None):
        self._shards = expand_files(shards, (".tar",), "webdataset")
        self.text_key = text_key
        self.name = name or f"webdataset:{os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else 'list'}"
        self.tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, name=self.name)

    def shards(self) -> list[str]:
        return list(self._shards)

    def num_records(self, shard: str) -> int | None:
        return None  # a tar file has no index: counting its samples means reading it

    def _samples(self, shard: str, start: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(position, key, {extension: bytes}) of each sample from `start` on; earlier members are not read."""
        import tarfile

        key, members, position = None, {}, -1
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, file_name = member.name.rpartition("/")
                    stem, _, extension = file_name.partition(".")
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        if key is not None and position >= start:
                            yield position, key, members
                        key, members, position = member_key, {}, position + 1
                    if position >= start:
                        members[extension.lower()] = tar.extractfile(member).read()
                # tarfile ends quietly at a header cut short; a whole tar has its two zero blocks after the last
                # member (a compressed one is checked by its decompressor).
                if shard.endswith(".tar") and os.path.getsize(shard) < tar.offset + 1024:
                    raise tarfile.ReadError("the file ends before the end-of-archive marker (truncated)")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InputFileError(f"{shard}: cannot read the tar shard after sample {position} ({key}): "
                                 f"{err}") from None
        if key is not None and position >= start:
            yield position, key, members

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        for position, key, members in self._samples(shard, start):
            sample_id = f"{shard}:{key}"
            image_ext = next((ext for ext in members if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
            fields: dict[str, Any] = {}
            try:
                if image_ext is None:
                    raise ImageLoadError(f"sample {sample_id}: no image member ({', '.join(IMAGE_EXTENSIONS)}); "
                                         f"members are {sorted(members)}")
                if "json" in members:
                    fields = json.loads(members["json"].decode("utf-8"))
                    if not isinstance(fields, dict):
                        raise ValueError(f"its json member is a {type(fields).__name__}, not an object")
                if "txt" in members:
                    fields.setdefault("txt", members["txt"].decode("utf-8"))
                image = load_image(members[image_ext], sample_id)
            except (ImageLoadError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                self.tracker.record_bad(sample_id, str(err))
                continue
            self.tracker.record_ok()
            record = {"id": key, "image": image, "text": _pick_text(fields, self.text_key), POSITION: position}
            if "json" in members:
                record["json"] = fields
            yield record


class ParquetShards:
    """Parquet files as image records: `image_key` holds encoded image bytes, a `{"bytes", "path"}` struct (a
    `datasets.Image` column) or a path (relative to `image_folder`, default the file's folder); the text is
    `text_key` (default the first of text / caption / txt), the id `id_key` (default `<file stem>-<row>`).
    Record counts come from the files' metadata; `read` skips whole row groups before `start`."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], image_key: str = "image",
                 text_key: str | None = None, id_key: str = "id", image_folder: str | os.PathLike | None = None,
                 max_bad_fraction: float = 0.01, batch_rows: int = 256, name: str | None = None):
        self._shards = expand_files(shards, (".parquet",), "parquet")
        self.image_key, self.text_key, self.id_key = image_key, text_key, id_key
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.batch_rows = batch_rows
        self.name = name or f"parquet:{os.fspath(shards) if isinstance(shards, (str, os.PathLike)) else 'list'}"
        self.tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, name=self.name)
        self._counts: dict[str, int] = {}

    def shards(self) -> list[str]:
        return list(self._shards)

    def _file(self, shard: str) -> Any:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(shard)
        except (OSError, pa.ArrowException) as err:
            raise InputFileError(f"{shard}: cannot read the Parquet file: {err}") from None

    def num_records(self, shard: str) -> int | None:
        if shard not in self._counts:
            self._counts[shard] = self._file(shard).metadata.num_rows
        return self._counts[shard]

    def _columns(self, shard: str, names: list[str]) -> tuple[str | None, str | None]:
        if self.image_key not in names:
            raise InputFileError(f"{shard}: no image column {self.image_key!r}; columns are {names}")
        if self.text_key is not None and self.text_key not in names:
            raise InputFileError(f"{shard}: no text column {self.text_key!r}; columns are {names}")
        text = self.text_key or next((key for key in TEXT_KEYS if key in names), None)
        return text, (self.id_key if self.id_key in names else None)

    def _image_source(self, value: Any, shard: str) -> Any:
        if isinstance(value, str):
            return str((self.image_folder or Path(shard).parent) / value)
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return {"path": str((self.image_folder or Path(shard).parent) / value["path"])}
        return value

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        parquet = self._file(shard)
        text_key, id_key = self._columns(shard, parquet.schema_arrow.names)
        columns = [c for c in (self.image_key, text_key, id_key) if c is not None]
        stem = Path(shard).stem
        position = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if position + rows <= start:
                position += rows
                continue
            table = parquet.read_row_group(group, columns=columns).slice(max(0, start - position))
            position += rows - table.num_rows
            for batch in table.to_batches(self.batch_rows):
                for row in batch.to_pylist():
                    sample_id = str(row[id_key]) if id_key is not None else f"{stem}-{position}"
                    try:
                        image = load_image(self._image_source(row[self.image_key], shard), sample_id)
                    except ImageLoadError as err:
                        self.tracker.record_bad(f"{shard}:{sample_id}", str(err))
                        position += 1
                        continue
                    self.tracker.record_ok()
                    yield {"id": sample_id, "image": image, "text": row.get(text_key) if text_key else None,
                           POSITION: position}
                    position += 1


class EncodedShards:
    """An image-record source whose records come out as code records: images are encoded by the visual
    `tokenizer` in batches of `batch_size` (resized and normalised by the tokenizer's `ImageTransform`), codes
    stored as in a code cache (`code_dtype` of each group's `num_codes`). Shards, counts and positions are the
    image source's, so resuming works the same."""

    def __init__(self, source: ShardSource, tokenizer: Any, batch_size: int = 32,
                 device: torch.device | str = "cpu"):
        from unimm.data.images import ImageTransform

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source, self.tokenizer, self.batch_size, self.device = source, tokenizer, batch_size, device
        self.name = f"{source.name}+encoded"
        self.tracker = getattr(source, "tracker", None)
        self.transform = ImageTransform.for_tokenizer(tokenizer)
        self.dtypes = {group: code_dtype(spec.get("num_codes")) for group, spec in
                       codebook_spec_dict(tokenizer).items()}

    def shards(self) -> list[str]:
        return self.source.shards()

    def num_records(self, shard: str) -> int | None:
        return self.source.num_records(shard)

    @torch.no_grad()
    def _encode(self, records: list[dict]) -> Iterator[dict]:
        pixels = self.transform.batch([r["image"] for r in records])
        pixels = pixels.to(device=self.device, dtype=getattr(self.tokenizer, "dtype", torch.float32))
        codes = {group: c.detach().to("cpu").numpy() for group, c in self.tokenizer.encode(pixels).items()}
        for i, record in enumerate(records):
            out = {key: value for key, value in record.items() if key != "image"}
            out["codes"] = {group: c[i].astype(self.dtypes.get(group, np.int32)) for group, c in codes.items()}
            yield out

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        pending: list[dict] = []
        for record in self.source.read(shard, start):
            pending.append(record)
            if len(pending) == self.batch_size:
                yield from self._encode(pending)
                pending = []
        if pending:
            yield from self._encode(pending)


def encode(source: ShardSource, tokenizer: Any, batch_size: int = 32,
           device: torch.device | str = "cpu") -> EncodedShards:
    """`source`'s image records as code records, encoded on the fly by `tokenizer` (see `EncodedShards`)."""
    return EncodedShards(source, tokenizer, batch_size=batch_size, device=device)


# ------------------------------------------------------------------------------------------- LLaVA JSON(L)


_INDEX_VERSION = 1
LINE_SUFFIXES = (".jsonl", ".txt")  # one record per line; any other file is a JSON list
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 16 << 20


def _jsonl_line_chunks(path: Path) -> Iterator[np.ndarray]:
    """[k, 2] byte spans (start, end) of the non-empty lines of a JSONL file, one array per chunk read."""
    line_start, base = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + base
            starts = np.concatenate([[line_start], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
            spans = np.stack([starts, ends], axis=1)
            if len(ends):
                line_start = int(ends[-1]) + 1
            base += len(chunk)
            yield spans[spans[:, 1] > spans[:, 0]]  # empty lines are no records ("\r" alone is dropped when read)
    if base > line_start:  # the last line has no newline
        yield np.array([[line_start, base]], np.int64)


def _write_index(spans: Iterator[np.ndarray], out: Path) -> int:
    """Raw int64 (start, end) pairs written to `out` as they come, in one pass over the data file: building the
    index of a file of any size takes the memory of one chunk. Returns the number of records."""
    count = 0
    with open(out, "wb") as f:
        for part in spans:
            f.write(np.ascontiguousarray(part, np.int64).tobytes())
            count += len(part)
    return count


def _json_array_spans(path: Path) -> np.ndarray:
    """[n, 2] byte spans of the top-level elements of a JSON list, found by decoding one element at a time from
    a sliding window of the file (no whole-file parse: memory stays at the window)."""
    import array

    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    spans = array.array("q")  # start, end, start, end ...: 16 bytes a record while the file is scanned
    with path.open("rb") as f:
        buf, pos, byte_pos, eof = "", 0, 0, False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            try:
                text = utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise InputFileError(f"{path}: not UTF-8 near byte {byte_pos + err.start}; data files must be "
                                     f"UTF-8 encoded") from None
            eof = not chunk
            buf, pos = buf[pos:] + text, 0
            return True

        def skip_space() -> str:
            nonlocal pos, byte_pos
            while True:
                end = _JSON_SPACE.match(buf, pos).end()
                byte_pos += end - pos  # JSON whitespace is ASCII: one byte per character
                pos = end
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        def fail(what: str) -> InputFileError:
            return InputFileError(f"{path}: invalid JSON list at byte {byte_pos} (record {len(spans) // 2}): "
                                  f"{what}")

        if skip_space() != "[":
            raise InputFileError(f"{path}: a LLaVA JSON file must hold a list of records")
        pos, byte_pos = pos + 1, byte_pos + 1
        if skip_space() == "]":
            return np.zeros((0, 2), np.int64)
        while True:
            while True:
                try:
                    _, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as err:
                    if eof:
                        raise fail(err.msg) from None
                more()  # the record may run past the window: widen it
            length = len(buf[pos:end].encode("utf-8"))
            spans.extend((byte_pos, byte_pos + length))
            pos, byte_pos = end, byte_pos + length
            separator = skip_space()
            if separator == "]":
                break
            if separator != ",":
                raise fail(f"expected ',' or ']' after a record, found {separator!r}" if separator else
                           "the file ends inside the list")
            pos, byte_pos = pos + 1, byte_pos + 1
            skip_space()
    return np.frombuffer(spans, np.int64).reshape(-1, 2)


def record_index(path: str | os.PathLike, index_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The [n, 2] byte spans of the records of the JSON list or JSONL file `path`, memory-mapped from
    `<file>.index.bin` beside it (raw int64 pairs; its size, the record count and the data file's size and
    modification time in `<file>.index.json`), or in `index_dir`, or in `~/.cache/unimm/json_index` when the data
    folder is read-only. Built on first use, rebuilt when the data file's size or modification time changes."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conversation file at {path}")
    stat = path.stat()
    if index_dir is None and os.access(path.parent, os.W_OK):
        stem = path.parent / path.name
    else:
        folder = Path(index_dir) if index_dir is not None else Path.home() / ".cache" / "unimm" / "json_index"
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{path.name}.{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    index_file, meta_file = Path(f"{stem}.index.bin"), Path(f"{stem}.index.json")
    meta = {"version": _INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if meta_file.is_file() and index_file.is_file():
        try:
            saved = json.loads(meta_file.read_text())
            if {key: saved.get(key) for key in meta} == meta and index_file.stat().st_size == 16 * saved["records"]:
                return _map_index(index_file, saved["records"])
        except (ValueError, OSError, KeyError, TypeError):
            pass  # a torn index is rebuilt
    tmp = Path(f"{index_file}.{os.getpid()}.tmp")
    lines = path.suffix.lower() in LINE_SUFFIXES
    spans = _jsonl_line_chunks(path) if lines else iter([_json_array_spans(path)])
    count = _write_index(spans, tmp)
    os.replace(tmp, index_file)
    meta_tmp = Path(f"{meta_file}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps({**meta, "records": count}))
    os.replace(meta_tmp, meta_file)
    logger.info("%s: indexed %d records into %s", path, count, index_file)
    return _map_index(index_file, count)


def _map_index(index_file: Path, count: int) -> np.ndarray:
    if count == 0:  # an empty file cannot be memory-mapped
        return np.zeros((0, 2), np.int64)
    return np.memmap(index_file, dtype=np.int64, mode="r", shape=(count, 2))


NEWLINE = b"\n"
_LINE_NUMBER_LIMIT = 64 << 20  # bytes read to name the line of a bad record; past it, the record and byte


def _where(file: str | os.PathLike, number: int, offset: int) -> str:
    """`file:line: record k (byte b)` for a bad record (the line counted only in the first 64 MiB of the file)."""
    line = ""
    if offset <= _LINE_NUMBER_LIMIT:
        with open(file, "rb") as f:
            line = f"{f.read(offset).count(NEWLINE) + 1}:"
    return f"{file}:{line} record {number} (byte {offset})"


def _span_records(file: str | os.PathLike, spans: np.ndarray, begin: int, end: int,
                  text_lines: bool = False) -> Iterator[tuple[int, Any, str | None]]:
    """`(number, value, problem)` for records `begin .. end - 1` of `file`, seeking to each indexed byte span and
    parsing only that record: `value` the decoded JSON (a `.txt` line: the line itself), or None with `problem`
    naming what is wrong with it. Blank lines are no records and are passed over."""
    with open(file, "rb") as f:
        for number in range(begin, end):
            first, last = int(spans[number, 0]), int(spans[number, 1])
            f.seek(first)
            raw = f.read(last - first)
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 (byte 0x{raw[err.start]:02x})"
                continue
            if not decoded.strip():
                continue  # a blank line ("\r\n")
            if text_lines:
                yield number, decoded.rstrip("\r\n"), None
                continue
            try:
                yield number, json.loads(decoded), None
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON ({err.msg})"


class LlavaJsonShards:
    """LLaVA conversation files (JSON lists or JSONL) read lazily: each file's record offsets are indexed once
    (`record_index`) and its records split into shards of `records_per_shard`, ids `<file>#<k>`; `read` seeks to
    a record and parses only the records it yields. A record that is not a JSON object is skipped and counted,
    named by file and record number. With `normalise`, records come out in the fixed columns the LLaVA sample
    builder reads (`unimm.data.sources.normalise_llava_record`: `id`, `images`, `conversations`, `malformed`)
    instead of as written, and a bad record is not skipped here but passed on with its reason in `malformed`, as
    `read_llava_json` does, to be counted where samples are built: then every record of the file comes out, and a
    consumer counting what it was given counts positions."""

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], records_per_shard: int = 8192,
                 index_dir: str | os.PathLike | None = None, max_bad_fraction: float = 0.01, name: str | None = None,
                 normalise: bool = False):
        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
        self.files = expand_files(files, (".json", ".jsonl"), "LLaVA JSON")
        self.records_per_shard = records_per_shard
        self.normalise = normalise
        self.name = name or f"llava:{os.fspath(files) if isinstance(files, (str, os.PathLike)) else 'list'}"
        self.tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, name=self.name)
        self.index = {file: record_index(file, index_dir) for file in self.files}
        self._shards = [f"{file}#{k}" for file in self.files
                        for k in range(-(-len(self.index[file]) // records_per_shard))]

    def shards(self) -> list[str]:
        return list(self._shards)

    def _range(self, shard: str) -> tuple[str, int, int]:
        file, _, k = shard.rpartition("#")
        if file not in self.index or not k.isdigit():
            raise KeyError(f"{shard!r} is not a shard of {self.name}")
        begin = int(k) * self.records_per_shard
        return file, begin, min(len(self.index[file]), begin + self.records_per_shard)

    def num_records(self, shard: str) -> int | None:
        _, begin, end = self._range(shard)
        return end - begin

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        from unimm.data.sources import normalise_llava_record

        file, begin, end = self._range(shard)
        spans = self.index[file]
        stem = Path(file).stem
        for number, record, problem in _span_records(file, spans, begin + start, end):
            where = f"{file}: record {number} (byte {int(spans[number, 0])})"
            if problem is None and not isinstance(record, dict):
                problem = f"a {type(record).__name__}, not a JSON object"
            if self.normalise:  # bad records go on, marked, to be counted where samples are built
                record = normalise_llava_record(record if problem is None else {"__malformed__": f"{where}: "
                                                                                 f"{problem}"}, number, stem)
            elif problem is not None:
                self.tracker.record_bad(where, problem)
                continue
            else:
                self.tracker.record_ok()
            record[POSITION] = number - begin
            yield record


class JsonShards:
    """Conversation or text records in JSON Lines / JSON list / text-line files, one shard per file, as the
    streaming mixture reads them: `path` is a file or a folder of `.jsonl` / `.json` / `.txt` files (sorted by
    name), so that nodes without a shared filesystem can each hold only their own files. `kind` is `conversation`
    (records in the fixed LLaVA columns of `unimm.data.sources.normalise_llava_record`, a bad one passed on with
    its reason to be counted where samples are built) or `text` (`{"id"?, "text"}` objects, or `.txt` lines).

    A file is indexed (`record_index`: byte spans, built once beside it, memory-mapped) the first time this
    process reads it, not when listed, so a node never opens another node's files; `read(shard, start)` then
    seeks to record `start` and parses only what it yields."""

    SUFFIXES = (".jsonl", ".json", ".txt")

    def __init__(self, path: str | os.PathLike, kind: str, index_dir: str | os.PathLike | None = None):
        if kind not in ("conversation", "text"):
            raise ValueError(f"kind must be conversation or text, got {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.name = f"{kind} data {self.path}"
        self.index_dir = index_dir
        if self.path.is_dir():
            files = sorted(f.name for f in self.path.iterdir()
                           if f.suffix.lower() in self.SUFFIXES and not is_index_file(f.name))
            if not files:
                raise InputFileError(f"{self.path}: no {'/'.join(self.SUFFIXES)} shard files in this folder")
            self._root, self._files = self.path, files
        elif self.path.is_file():
            self._root, self._files = self.path.parent, [self.path.name]
        else:
            raise FileNotFoundError(f"{kind} data not found: {self.path}")
        self._spans: dict[str, np.ndarray] = {}

    def shards(self) -> list[str]:
        return list(self._files)

    def _index(self, shard: str) -> np.ndarray:
        if shard not in self._spans:
            self._spans[shard] = record_index(self._root / shard, self.index_dir)
        return self._spans[shard]

    def num_records(self, shard: str) -> int | None:
        return len(self._spans[shard]) if shard in self._spans else None

    def read(self, shard: str, start: int = 0) -> Iterator[dict]:
        from unimm.data.sources import normalise_llava_record

        file = self._root / shard
        spans = self._index(shard)
        text_lines = file.suffix.lower() == ".txt"
        for number, value, problem in _span_records(file, spans, start, len(spans), text_lines=text_lines):
            where = _where(file, number, int(spans[number, 0])) if problem is not None else ""
            if self.kind == "conversation":
                record = normalise_llava_record(value if problem is None else {"__malformed__": f"{where}: "
                                                                                f"{problem}"}, number, shard)
            elif problem is not None:
                raise InputFileError(f"{where}: {problem}")
            elif text_lines:
                record = {"id": f"{shard}-{number}", "text": value}
            elif isinstance(value, dict) and isinstance(value.get("text"), str):
                record = {"id": str(value.get("id", f"{shard}-{number}")), "text": value["text"]}
            else:
                raise InputFileError(f"{where}: has no string field 'text'")
            record[POSITION] = number
            yield record
