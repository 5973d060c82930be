"""Offline code cache, the format: a visual tokenizer's codes for a dataset's images in Arrow shards, so LLM training
reads code inputs and targets from disk instead of running the tokenizer in the step. The program that writes
them (`scripts/pretokenize.py`) is `unimm.data.pretokenize`; `unimm.data.shards.CodeCacheShards` reads a cache
as a stream.

Layout of a cache directory:
- `shard-00000.arrow` ... : Arrow IPC streams with columns `id` (the record id, or the image path as written in
  a LLaVA file), `text` (caption, when the source has one) and `codes_<group>` (N*D codes flattened, stored in
  the smallest integer type that holds the group's `num_codes`: uint8 up to 256 codes, int16 up to 32768, else
  int32; format 2 caches, all int32, still read);
- `shard-00000.json` ... : per-shard counts, skipped ids and the Arrow file's size and xxh3-128 checksum, written
  after the Arrow file, so its presence marks the shard finished (an interrupted shard is redone from its start
  on resume, and a finished shard whose file no longer matches its checksum is re-encoded);
- `pretokenize_state.json`: what the run was started with (tokenizer config and weights hashes, number of records
  and shard size, or the input shard files when input file i becomes shard i), so a resume with different inputs
  is refused;
- `cache_info.json`, the manifest: written once every shard exists (by every node's first process, from the
  shard records gathered over the process group, so nodes without a shared filesystem each get it); the
  tokenizer's config hash (`tokenizer_config_hash`: architecture) and weights hash (`tokenizer_weights_hash`: an
  xxh3-128 of its state dict), codebook spec, per-group shapes and code dtypes, the shard list with every shard's
  record count and checksum, skipped ids and the command that rebuilds the cache.

`load_code_cache` refuses a cache made by another tokenizer (config or weights, naming both hashes; an explicit
`allow_weights_mismatch` lets a user who knows the codebooks agree go on) and verifies every shard's size and
checksum before use, so a truncated or corrupted shard is one error naming the file and the rebuild command.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.tokenizer.identity import (  # noqa: F401 - re-exported for callers of the old home
    TokenizerIdentity,
    file_checksum,
    tokenizer_weights_hash,
    weights_hash_of_folder,
)
from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
STATE_FILE = "pretokenize_state.json"
CACHE_FORMAT_VERSION = 3  # 2: tokenizer weights hash and per-shard checksums; 3: smallest code dtype, shard counts
READABLE_FORMAT_VERSIONS = (2, 3)  # format 2 differs only in its int32 codes and the manifest's missing counts


class CodeCacheMismatchError(UserError, ValueError):
    """The cache was written by a different tokenizer (or a different pretokenize run)."""


class CodeCacheCorruptError(UserError, ValueError):
    """A cache shard is missing, truncated or does not match its recorded checksum."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _tokenizer_hash(tokenizer_or_hash: Any) -> str:
    return tokenizer_or_hash if isinstance(tokenizer_or_hash, str) else str(tokenizer_or_hash.config_hash())


def codebook_spec_dict(tokenizer: Any) -> dict[str, dict[str, int]]:
    spec = getattr(tokenizer, "codebook_spec", None) or {}
    return {name: (group.to_dict() if hasattr(group, "to_dict") else dict(group)) for name, group in spec.items()}


def code_dtype(num_codes: int | None) -> np.dtype:
    """The smallest integer type that holds codes `0 .. num_codes - 1`: uint8 up to 256 codes, int16 up to 32768
    (16384-code codebooks: half the bytes of int32), else int32 (also when `num_codes` is unknown). Signed 16 bits
    rather than uint16, which torch reads only partly."""
    if num_codes is not None and num_codes <= 1 << 8:
        return np.dtype(np.uint8)
    if num_codes is not None and num_codes <= 1 << 15:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _tmp_path(path: Path) -> Path:
    """A temporary name beside `path` that no other process writes (nodes sharing a filesystem may write the same
    manifest at once; each replaces it atomically with identical content)."""
    return path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _write_arrow_atomic(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write `table` to `path` (via a temporary file) and return its size and checksum."""
    tmp = _tmp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    checksum = {"xxh3_128": file_checksum(tmp), "num_bytes": tmp.stat().st_size}
    os.replace(tmp, path)
    return checksum


def shard_problem(path: Path, checksum: dict[str, Any] | None) -> str | None:
    """Why the shard file `path` does not match its recorded `checksum` (None when it does)."""
    if checksum is None:
        return "no checksum was recorded for it"
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if size != checksum["num_bytes"]:
        return f"it is {size} bytes, {checksum['num_bytes']} were written (truncated or overwritten)"
    actual = file_checksum(path)
    if actual != checksum["xxh3_128"]:
        return f"its xxh3_128 checksum is {actual}, {checksum['xxh3_128']} was recorded (corrupted)"
    return None


def shard_table(ids: list[str], texts: list[str] | None, codes: dict[str, np.ndarray],
                spec: dict[str, dict[str, int]]) -> pa.Table:
    """The Arrow table of one shard: `id`, `text` (when given) and `codes_<group>` from integer [B, N*D] arrays,
    each group stored in `code_dtype` of its `num_codes` in `spec`; a code outside the codebook is refused (it
    would wrap around in the smaller type)."""
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if texts is not None:
        columns["text"] = pa.array(texts, pa.string())
    for name, flat in codes.items():
        num_codes = spec.get(name, {}).get("num_codes")
        if flat.size and (int(flat.min()) < 0 or (num_codes is not None and int(flat.max()) >= num_codes)):
            raise ValueError(f"codes of group {name!r} span [{int(flat.min())}, {int(flat.max())}], outside its "
                             f"codebook of {num_codes} codes")
        values = pa.array(np.ascontiguousarray(flat, dtype=code_dtype(num_codes)).reshape(-1))
        offsets = np.arange(flat.shape[0] + 1, dtype=np.int32) * flat.shape[1]
        columns[f"codes_{name}"] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(columns)


def shard_meta_path(out: Path, shard: int) -> Path:
    return out / f"{shard_name(shard)}.json"


def write_shard(out: Path, shard: int, start: int, stop: int, table: pa.Table, meta: dict) -> dict:
    """Shard `shard`'s Arrow file, then its `.json` (the mark that it is finished). Returns that record."""
    checksum = _write_arrow_atomic(out / f"{shard_name(shard)}.arrow", table)
    record = {"shard": shard, "start": start, "stop": stop, **meta, "checksum": checksum}
    write_json_atomic(shard_meta_path(out, shard), record)
    return record


def pretokenize_state(tokenizer: Any, weights_hash: str | None, num_records: int | None, shard_size: int | None,
                       source: str | None, input_shards: list[str] | None = None) -> dict:
    """What a pretokenize run is started with: records split into shards of `shard_size`, or (`input_shards`, the
    input's shard files, when the number of records is not known up front) output shard i from input shard i."""
    state = {"format_version": CACHE_FORMAT_VERSION, "tokenizer_config_hash": _tokenizer_hash(tokenizer),
             "tokenizer_weights_hash": weights_hash or tokenizer_weights_hash(tokenizer),
             "num_records": num_records, "shard_size": shard_size, "source": source}
    if input_shards is not None:
        state["input_shards"] = list(input_shards)
    return state


def num_shards_of(state: dict) -> int:
    if state.get("input_shards") is not None:
        return len(state["input_shards"])
    return max(1, -(-state["num_records"] // state["shard_size"]))


def write_code_cache(out_dir: str | os.PathLike, tokenizer: Any, ids: list[str], codes: dict[str, np.ndarray],
                     texts: list[str] | None = None, shard_size: int = 1024, source: str | None = None) -> dict:
    """A finished cache in `out_dir` from codes computed elsewhere (`codes`: group -> int [num_records, N, D], in
    `tokenizer`'s codebooks): the same shards, checksums and `cache_info.json` as `pretokenize` followed by
    `finalize_code_cache`, written by the same functions. Returns the info."""
    out = Path(out_dir)
    if (out / STATE_FILE).exists() or (out / CACHE_INFO).exists():
        raise ValueError(f"{out} already holds a code cache; write into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    num_records = len(ids)
    spec = codebook_spec_dict(tokenizer)
    if sorted(codes) != sorted(spec):
        raise ValueError(f"codes have groups {sorted(codes)}, the tokenizer's codebooks are {sorted(spec)}")
    for name, group in codes.items():
        if group.ndim != 3 or len(group) != num_records:
            raise ValueError(f"codes[{name!r}] must be [{num_records}, N, D], got {list(group.shape)}")
    if texts is not None and len(texts) != num_records:
        raise ValueError(f"{len(texts)} texts for {num_records} records")
    write_json_atomic(out / STATE_FILE, pretokenize_state(tokenizer, None, num_records, shard_size, source))
    shapes = {name: list(group.shape[1:]) for name, group in codes.items()}
    for shard in range(max(1, -(-num_records // shard_size))):
        start, stop = shard * shard_size, min(num_records, (shard + 1) * shard_size)
        flat = {name: np.asarray(codes[name][start:stop]).reshape(stop - start, -1) for name in spec}
        table = shard_table(ids[start:stop], None if texts is None else texts[start:stop], flat, spec)
        meta = {"num_records": stop - start, "num_written": stop - start, "skipped": [], "shapes": shapes}
        write_shard(out, shard, start, stop, table, meta)
    return finalize_code_cache(out, tokenizer)


def finalize_code_cache(out_dir: str | os.PathLike, tokenizer: Any, max_bad_fraction: float = 1.0,
                        rebuild_command: str | None = None, shard_records: list[dict] | None = None) -> dict:
    """Check every shard is finished, merge their counts and checksums and write the manifest `cache_info.json`
    (with `rebuild_command`, the pretokenize command line that rebuilds this cache, quoted in shard errors).
    Returns the info.

    The shards' records (their `.json`) are read from `out_dir`, or taken from `shard_records` when given: what
    every process of a multi-node run wrote, gathered over the process group, so a node whose disk holds only its
    own shards still writes the whole manifest."""
    out = Path(out_dir)
    state = json.loads((out / STATE_FILE).read_text())
    if state.get("format_version") != CACHE_FORMAT_VERSION:
        raise CodeCacheMismatchError(f"{out}: pretokenize state has format version {state.get('format_version')}, "
                                     f"expected {CACHE_FORMAT_VERSION}; pretokenize into a new output_dir")
    num_shards = num_shards_of(state)
    if shard_records is None:
        by_index = {s: json.loads(shard_meta_path(out, s).read_text()) for s in range(num_shards)
                    if shard_meta_path(out, s).exists()}
    else:
        by_index = {record["shard"]: record for record in shard_records}
    missing = [s for s in range(num_shards) if s not in by_index]
    if missing:
        raise RuntimeError(f"{out}: shard(s) {missing} are not finished; rerun pretokenize to complete them")
    metas = [by_index[s] for s in range(num_shards)]
    shapes: dict[str, list[int]] = {}
    for meta in metas:
        shapes.update(meta["shapes"])
    skipped = [entry for meta in metas for entry in meta["skipped"]]
    num_written = sum(meta["num_written"] for meta in metas)
    tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, min_seen=0, name=f"code cache {out}")
    tracker.num_ok, tracker.num_bad, tracker.bad_examples = num_written, len(skipped), skipped[:20]
    tracker.check(final=True)
    spec = codebook_spec_dict(tokenizer)
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "tokenizer_config_hash": _tokenizer_hash(tokenizer),
        "codebook_spec": spec,
        "shapes": shapes,  # group -> [N, D]
        "code_dtypes": {name: code_dtype(spec.get(name, {}).get("num_codes")).name for name in shapes},
        "image_size": int(tokenizer.image_size),
        "num_records": sum(meta["num_records"] for meta in metas),
        "num_codes_written": num_written,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": [f"{shard_name(s)}.arrow" for s in range(num_shards)],
        "shard_checksums": {f"{shard_name(s)}.arrow": metas[s]["checksum"] for s in range(num_shards)},
        "shard_num_records": {f"{shard_name(s)}.arrow": metas[s]["num_written"] for s in range(num_shards)},
        "tokenizer_weights_hash": state["tokenizer_weights_hash"],
        "source": state.get("source"),
        "rebuild_command": rebuild_command,
    }
    if info["tokenizer_config_hash"] != state["tokenizer_config_hash"]:
        raise CodeCacheMismatchError(f"{out}: shards were written with tokenizer hash {state['tokenizer_config_hash']}"
                                     f", finalising with {info['tokenizer_config_hash']}")
    write_json_atomic(out / CACHE_INFO, info)
    return info


class CodeCache:
    """A finished code cache: `cache[i]` -> `{"id", "text"?, "codes": {group: LongTensor [N, D]}}`, and
    `codes_for(key)` by record id / image path."""

    def __init__(self, path: Path, info: dict, dataset: Any):
        self.path = path
        self.info = info
        self.dataset = dataset
        self.group_names = list(info["shapes"])
        self.shapes = {name: tuple(shape) for name, shape in info["shapes"].items()}
        self.has_text = "text" in dataset.column_names
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_positions(self) -> int:
        """LLM positions of one cached image: N of the codes' [N, D] shape (the same for every record and group)."""
        return int(next(iter(self.shapes.values()))[0]) if self.shapes else 0

    def text_bytes(self) -> np.ndarray:
        """UTF-8 bytes of every record's caption (int64 [len(self)]), read from the `text` column's Arrow offsets
        (memory-mapped: the captions themselves are not read)."""
        from unimm.data.sources import text_bytes

        if not self.has_text:
            raise ValueError(f"code cache {self.path} has no captions ('text' column)")
        return text_bytes(self.dataset, "text")

    def _row(self, row: dict) -> dict:
        codes = {name: torch.tensor(row[f"codes_{name}"], dtype=torch.long).view(*self.shapes[name])
                 for name in self.group_names}
        out = {"id": row["id"], "codes": codes}
        if self.has_text:
            out["text"] = row["text"]
        return out

    def __getitem__(self, index: int) -> dict:
        return self._row(self.dataset[int(index)])

    def keys(self) -> list[str]:
        return self.dataset.with_format("arrow")["id"].to_pylist()  # one Arrow read, not a row-by-row decode

    def __contains__(self, key: str) -> bool:
        return key in self._key_index()

    def _key_index(self) -> dict[str, int]:
        if self._index is None:
            keys = self.keys()
            self._index = dict(zip(keys, range(len(keys))))
        return self._index

    def codes_for(self, key: str) -> dict[str, torch.Tensor]:
        index = self._key_index().get(key)
        if index is None:
            raise KeyError(f"{key!r} is not in the code cache {self.path} (was it skipped when pretokenizing? "
                           f"{self.info.get('num_skipped', 0)} image(s) were)")
        return self[index]["codes"]


def rebuild_hint(path: Path, info: dict) -> str:
    command = info.get("rebuild_command")
    if command:
        return f"rebuild it with: {command} (only damaged shards are re-encoded)"
    return (f"rebuild it by rerunning scripts/pretokenize.py with --output_dir {shlex.quote(str(path))} and the "
            f"--data / --visual_tokenizer_path it was made with (only damaged shards are re-encoded)")


def check_identity(path: Path, info: dict, expected: Any, allow_weights_mismatch: bool) -> None:
    if isinstance(expected, str):  # a bare config hash: architecture only
        expected_config, expected_weights = expected, None
    else:
        identity = expected if isinstance(expected, TokenizerIdentity) else TokenizerIdentity.of(expected)
        expected_config, expected_weights = identity.config_hash, identity.weights_hash
    if info.get("tokenizer_config_hash") != expected_config:
        raise CodeCacheMismatchError(
            f"code cache {path} was written by a tokenizer with config hash {info.get('tokenizer_config_hash')}, "
            f"but the training tokenizer's hash is {expected_config}; re-run scripts/pretokenize.py with this "
            f"tokenizer")
    cached_weights = info.get("tokenizer_weights_hash")
    if expected_weights is None or cached_weights == expected_weights:
        return
    message = (f"code cache {path} was written by a tokenizer with weights hash {cached_weights}, but the training "
               f"tokenizer's weights hash is {expected_weights} (same config, other weights: its codes come from "
               f"another codebook)")
    if allow_weights_mismatch:
        logger.warning("%s; using it anyway (allow_tokenizer_weights_mismatch)", message)
        return
    raise CodeCacheMismatchError(f"{message}; re-run scripts/pretokenize.py with this tokenizer, or, if the "
                                 f"codebooks are known to agree, pass --allow_tokenizer_weights_mismatch true "
                                 f"to the training program")


def verify_code_cache(path: str | os.PathLike, info: dict | None = None) -> None:
    """Check every shard of the finished cache at `path` against its recorded size and checksum; raise
    `CodeCacheCorruptError` naming the first bad shard file and the command that rebuilds it."""
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    info = info if info is not None else json.loads((path / CACHE_INFO).read_text())
    checksums = info.get("shard_checksums") or {}
    names = list(info["shards"])
    # File reads (and hashing of large buffers) release the GIL: shards are checked in parallel.
    threads = max(1, min(8, len(names), os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda name: shard_problem(path / name, checksums.get(name)), names))
    for name, problem in zip(names, problems):
        if problem is not None:
            raise CodeCacheCorruptError(f"code cache shard {path / name} is unusable: {problem}; "
                                        f"{rebuild_hint(path, info)}")


def load_code_cache(path: str | os.PathLike, expected_hash: Any | None, allow_weights_mismatch: bool = False,
                    verify: bool = True) -> CodeCache:
    """Open the cache at `path`, refusing one made by another tokenizer and checking every shard's checksum.

    `expected_hash` is the training tokenizer (or its `TokenizerIdentity`): both its config hash and its weights
    hash must match what the cache recorded, each refusal naming both hashes and the path. A bare config-hash
    string checks the architecture only; `None` skips the check (inspection only). `allow_weights_mismatch`
    turns a weights-hash mismatch into a warning. `verify=False` skips the shard sizes and checksums (a shard
    that cannot be opened is still named, with the rebuild command)."""
    import datasets

    path = Path(path)
    info = read_cache_info(path)
    if expected_hash is not None:
        check_identity(path, info, expected_hash, allow_weights_mismatch)
    if verify:
        verify_code_cache(path, info)
    shards = []
    for name in info["shards"]:
        try:
            shards.append(datasets.Dataset.from_file(str(path / name)))
        except (OSError, pa.ArrowException) as err:
            raise CodeCacheCorruptError(f"code cache shard {path / name} cannot be read ({err}); "
                                        f"{rebuild_hint(path, info)}") from None
    dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    return CodeCache(path, info, dataset)


def read_cache_info(path: str | os.PathLike) -> dict:
    """The manifest of the finished cache at `path`, refusing a missing, unreadable or unknown-format one."""
    path = Path(path)
    info_path = path / CACHE_INFO
    if not info_path.is_file():
        partial = " (pretokenize did not finish: rerun it to resume)" if (path / STATE_FILE).exists() else ""
        raise FileNotFoundError(f"no {CACHE_INFO} in {path}; not a finished code cache{partial}")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise CodeCacheCorruptError(f"{info_path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                                    f"{err.msg}); {rebuild_hint(path, {})}") from None
    if info.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CodeCacheMismatchError(
            f"code cache {path} has format version {info.get('format_version')}, this UniMM reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (which record tokenizer weights and shard checksums); "
            f"rebuild it into a new --output_dir with scripts/pretokenize.py")
    return info


# The pretokenize program moved to `unimm.data.pretokenize`; its names stay importable from here.
_MOVED_TO_PRETOKENIZE = ("PretokenizeConfig", "PretokenizeResult", "llava_image_records", "pretokenize",
                         "rebuild_command", "run_pretokenize")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_PRETOKENIZE:
        import importlib

        return getattr(importlib.import_module("unimm.data.pretokenize"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
