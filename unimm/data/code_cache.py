"""Offline code cache: the visual tokenizer runs once over a dataset's images and its codes are stored in Arrow
shards, so LLM training reads code inputs and targets from disk instead of running the tokenizer in the step.

Layout of a cache directory:
- `shard-00000.arrow` ... : Arrow IPC streams with columns `id` (the record id, or the image path as written in
  a LLaVA file), `text` (caption, when the source has one) and `codes_<group>` (int32, N*D codes flattened);
- `shard-00000.json` ... : per-shard counts, skipped ids and the Arrow file's size and xxh3-128 checksum, written
  after the Arrow file, so its presence marks the shard finished (an interrupted shard is redone from its start
  on resume, and a finished shard whose file no longer matches its checksum is re-encoded);
- `pretokenize_state.json`: what the run was started with (tokenizer config and weights hashes, number of records,
  shard size), so a resume with different inputs is refused;
- `cache_info.json`: written at the end; the tokenizer's config hash (`tokenizer_config_hash`: architecture) and
  weights hash (`tokenizer_weights_hash`: an xxh3-128 of its state dict), codebook spec, per-group shapes, counts,
  skipped ids, every shard's checksum and the command that rebuilds the cache.

`load_code_cache` refuses a cache made by another tokenizer (config or weights, naming both hashes; an explicit
`allow_weights_mismatch` lets a user who knows the codebooks agree go on) and verifies every shard's size and
checksum before use, so a truncated or corrupted shard is one error naming the file and the rebuild command.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.tokenizer.identity import (
    TokenizerIdentity,
    file_checksum,
    tokenizer_weights_hash,
    weights_hash_of_folder,  # noqa: F401 - re-exported for callers of the old home
)
from unimm.utils.config import config_field
from unimm.utils.errors import UserError, json_source_errors, model_folder, require_path
from unimm.utils.runtime import DTYPES

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
STATE_FILE = "pretokenize_state.json"
CACHE_FORMAT_VERSION = 2  # 2: tokenizer weights hash and per-shard checksums


class CodeCacheMismatchError(UserError, ValueError):
    """The cache was written by a different tokenizer (or a different pretokenize run)."""


class CodeCacheCorruptError(UserError, ValueError):
    """A cache shard is missing, truncated or does not match its recorded checksum."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _tokenizer_hash(tokenizer_or_hash: Any) -> str:
    return tokenizer_or_hash if isinstance(tokenizer_or_hash, str) else str(tokenizer_or_hash.config_hash())


def _codebook_spec_dict(tokenizer: Any) -> dict[str, dict[str, int]]:
    spec = getattr(tokenizer, "codebook_spec", None) or {}
    return {name: (group.to_dict() if hasattr(group, "to_dict") else dict(group)) for name, group in spec.items()}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _write_arrow_atomic(path: Path, table: pa.Table) -> dict[str, Any]:
    """Write `table` to `path` (via a temporary file) and return its size and checksum."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    checksum = {"xxh3_128": file_checksum(tmp), "num_bytes": tmp.stat().st_size}
    os.replace(tmp, path)
    return checksum


def _shard_problem(path: Path, checksum: dict[str, Any] | None) -> str | None:
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


@dataclass
class PretokenizeResult:
    """What one process did: shards written now, shards skipped because a previous run finished them."""

    written_shards: list[int]
    skipped_shards: list[int]
    num_shards: int


@torch.no_grad()
def _encode_shard(records: Any, tokenizer: Any, transform: ImageTransform, batch_size: int, num_workers: int,
                  device: torch.device | str, tracker: BadSampleTracker, progress: Any) -> tuple[pa.Table, dict]:
    has_text = "text" in (records.column_names or [])
    loader = torch.utils.data.DataLoader(ImageDataset(records, transform), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_images)
    ids: list[str] = []
    groups: dict[str, list[np.ndarray]] = {}
    shapes: dict[str, list[int]] = {}
    skipped: list[list[str]] = []
    for batch in loader:
        for sample_id, reason in batch["skipped"]:
            skipped.append([sample_id, reason])
            tracker.record_bad(sample_id, reason)
        if batch["ids"]:
            pixel_values = batch["pixel_values"].to(device=device, dtype=getattr(tokenizer, "dtype", torch.float32))
            codes = tokenizer.encode(pixel_values)  # group -> [B, N, D]
            for name, group_codes in codes.items():
                group_codes = group_codes.detach().to("cpu", torch.int32)
                shapes[name] = list(group_codes.shape[1:])
                groups.setdefault(name, []).append(group_codes.reshape(group_codes.shape[0], -1).numpy())
            ids.extend(batch["ids"])
            tracker.record_ok(len(batch["ids"]))
        if progress is not None:
            progress.update(len(batch["ids"]) + len(batch["skipped"]))
    texts = None
    if has_text:
        kept = set(ids)
        text_by_id = {r["id"]: r["text"] for r in records.select_columns(["id", "text"]) if r["id"] in kept}
        texts = [text_by_id[i] for i in ids]
    codes = {name: np.concatenate(groups[name]) if groups.get(name) else np.zeros((0, 0), np.int32)
             for name in _codebook_spec_dict(tokenizer) or groups}
    meta = {"num_records": len(records), "num_written": len(ids), "skipped": skipped, "shapes": shapes}
    return _shard_table(ids, texts, codes), meta


def _shard_table(ids: list[str], texts: list[str] | None, codes: dict[str, np.ndarray]) -> pa.Table:
    """The Arrow table of one shard: `id`, `text` (when given) and `codes_<group>` from int32 [B, N*D] arrays."""
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if texts is not None:
        columns["text"] = pa.array(texts, pa.string())
    for name, flat in codes.items():
        offsets = np.arange(flat.shape[0] + 1, dtype=np.int32) * flat.shape[1]
        columns[f"codes_{name}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))
    return pa.table(columns)


def _write_shard(out: Path, shard: int, start: int, stop: int, table: pa.Table, meta: dict) -> None:
    """Shard `shard`'s Arrow file, then its `.json` (the mark that it is finished)."""
    checksum = _write_arrow_atomic(out / f"{shard_name(shard)}.arrow", table)
    _write_json_atomic(out / f"{shard_name(shard)}.json",
                       {"shard": shard, "start": start, "stop": stop, **meta, "checksum": checksum})


def _pretokenize_state(tokenizer: Any, weights_hash: str | None, num_records: int, shard_size: int,
                       source: str | None) -> dict:
    return {"format_version": CACHE_FORMAT_VERSION, "tokenizer_config_hash": _tokenizer_hash(tokenizer),
            "tokenizer_weights_hash": weights_hash or tokenizer_weights_hash(tokenizer),
            "num_records": num_records, "shard_size": shard_size, "source": source}


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
    spec = _codebook_spec_dict(tokenizer)
    if sorted(codes) != sorted(spec):
        raise ValueError(f"codes have groups {sorted(codes)}, the tokenizer's codebooks are {sorted(spec)}")
    for name, group in codes.items():
        if group.ndim != 3 or len(group) != num_records:
            raise ValueError(f"codes[{name!r}] must be [{num_records}, N, D], got {list(group.shape)}")
    if texts is not None and len(texts) != num_records:
        raise ValueError(f"{len(texts)} texts for {num_records} records")
    _write_json_atomic(out / STATE_FILE, _pretokenize_state(tokenizer, None, num_records, shard_size, source))
    shapes = {name: list(group.shape[1:]) for name, group in codes.items()}
    for shard in range(max(1, -(-num_records // shard_size))):
        start, stop = shard * shard_size, min(num_records, (shard + 1) * shard_size)
        flat = {name: np.ascontiguousarray(codes[name][start:stop], dtype=np.int32).reshape(stop - start, -1)
                for name in spec}
        table = _shard_table(ids[start:stop], None if texts is None else texts[start:stop], flat)
        meta = {"num_records": stop - start, "num_written": stop - start, "skipped": [], "shapes": shapes}
        _write_shard(out, shard, start, stop, table, meta)
    return finalize_code_cache(out, tokenizer)


def pretokenize(records: Any, tokenizer: Any, out_dir: str | os.PathLike, batch_size: int = 32,
                shard_size: int = 1024, num_workers: int = 0, device: torch.device | str = "cpu",
                process_index: int = 0, num_processes: int = 1, max_bad_fraction: float = 0.01,
                source: str | None = None, show_progress: bool = True,
                weights_hash: str | None = None) -> PretokenizeResult:
    """Encode the images of `records` (a map-style `datasets.Dataset` with `id`, `image`, optional `text`, as from
    `read_image_records`) with `tokenizer` and write this process's shards of the cache in `out_dir`.

    Shard `s` holds records `[s * shard_size, (s + 1) * shard_size)` and belongs to process `s % num_processes`.
    Finished shards (their `.json` exists and the Arrow file matches the checksum in it) are skipped, so rerunning
    after an interruption resumes, and rerunning on a finished cache re-encodes only the shards that are damaged.
    Call `finalize_code_cache` once every process is done (the script does it on the main process after a
    barrier). `weights_hash` is `tokenizer_weights_hash(tokenizer)` when the caller already has it (or took it
    before casting the tokenizer to a lower precision).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    num_records = len(records)
    state = _pretokenize_state(tokenizer, weights_hash, num_records, shard_size, source)
    state_path = out / STATE_FILE
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        if previous != state:
            raise CodeCacheMismatchError(f"{out} holds a pretokenize run started with {previous}, but this run has "
                                         f"{state}; use another out_dir or delete the old cache")
    elif process_index == 0:
        _write_json_atomic(state_path, state)
    num_shards = max(1, -(-num_records // shard_size))
    mine = [s for s in range(num_shards) if s % num_processes == process_index]
    done = [s for s in mine if _shard_finished(out, s)]
    todo = [s for s in mine if s not in done]
    transform = ImageTransform.for_tokenizer(tokenizer)
    tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, name=f"pretokenize[{process_index}]")
    total = sum(min(shard_size, num_records - s * shard_size) for s in todo)
    progress = tqdm(total=total, desc=f"pretokenize (process {process_index})", unit="img",
                    disable=not show_progress)
    if done:
        logger.info("process %d: %d shard(s) already finished, %d to do", process_index, len(done), len(todo))
    for shard in todo:
        start, stop = shard * shard_size, min(num_records, (shard + 1) * shard_size)
        table, meta = _encode_shard(records.select(range(start, stop)), tokenizer, transform, batch_size,
                                    num_workers, device, tracker, progress)
        _write_shard(out, shard, start, stop, table, meta)
    progress.close()
    tracker.check(final=True)
    return PretokenizeResult(written_shards=todo, skipped_shards=done, num_shards=num_shards)


def _shard_finished(out: Path, shard: int) -> bool:
    """Whether `shard` was finished and its Arrow file is still what was written (else it must be re-encoded)."""
    meta_path = out / f"{shard_name(shard)}.json"
    if not meta_path.exists():
        return False
    problem = _shard_problem(out / f"{shard_name(shard)}.arrow", json.loads(meta_path.read_text()).get("checksum"))
    if problem is not None:
        logger.warning("%s: %s; re-encoding it", out / f"{shard_name(shard)}.arrow", problem)
        return False
    return True


def finalize_code_cache(out_dir: str | os.PathLike, tokenizer: Any, max_bad_fraction: float = 1.0,
                        rebuild_command: str | None = None) -> dict:
    """Check every shard is finished, merge their counts and checksums and write `cache_info.json` (with
    `rebuild_command`, the pretokenize command line that rebuilds this cache, quoted in shard errors). Returns
    the info."""
    out = Path(out_dir)
    state = json.loads((out / STATE_FILE).read_text())
    if state.get("format_version") != CACHE_FORMAT_VERSION:
        raise CodeCacheMismatchError(f"{out}: pretokenize state has format version {state.get('format_version')}, "
                                     f"expected {CACHE_FORMAT_VERSION}; pretokenize into a new output_dir")
    num_shards = max(1, -(-state["num_records"] // state["shard_size"]))
    missing = [s for s in range(num_shards) if not (out / f"{shard_name(s)}.json").exists()]
    if missing:
        raise RuntimeError(f"{out}: shard(s) {missing} are not finished; rerun pretokenize to complete them")
    metas = [json.loads((out / f"{shard_name(s)}.json").read_text()) for s in range(num_shards)]
    shapes: dict[str, list[int]] = {}
    for meta in metas:
        shapes.update(meta["shapes"])
    skipped = [entry for meta in metas for entry in meta["skipped"]]
    num_written = sum(meta["num_written"] for meta in metas)
    tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, min_seen=0, name=f"code cache {out}")
    tracker.num_ok, tracker.num_bad, tracker.bad_examples = num_written, len(skipped), skipped[:20]
    tracker.check(final=True)
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "tokenizer_config_hash": _tokenizer_hash(tokenizer),
        "codebook_spec": _codebook_spec_dict(tokenizer),
        "shapes": shapes,  # group -> [N, D]
        "image_size": int(tokenizer.image_size),
        "num_records": state["num_records"],
        "num_codes_written": num_written,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "shards": [f"{shard_name(s)}.arrow" for s in range(num_shards)],
        "shard_checksums": {f"{shard_name(s)}.arrow": metas[s]["checksum"] for s in range(num_shards)},
        "tokenizer_weights_hash": state["tokenizer_weights_hash"],
        "source": state.get("source"),
        "rebuild_command": rebuild_command,
    }
    if info["tokenizer_config_hash"] != state["tokenizer_config_hash"]:
        raise CodeCacheMismatchError(f"{out}: shards were written with tokenizer hash {state['tokenizer_config_hash']}"
                                     f", finalising with {info['tokenizer_config_hash']}")
    _write_json_atomic(out / CACHE_INFO, info)
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


def _rebuild_hint(path: Path, info: dict) -> str:
    command = info.get("rebuild_command")
    if command:
        return f"rebuild it with: {command} (only damaged shards are re-encoded)"
    return (f"rebuild it by rerunning scripts/pretokenize.py with --output_dir {shlex.quote(str(path))} and the "
            f"--data / --tokenizer_path it was made with (only damaged shards are re-encoded)")


def _check_identity(path: Path, info: dict, expected: Any, allow_weights_mismatch: bool) -> None:
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
        problems = list(pool.map(lambda name: _shard_problem(path / name, checksums.get(name)), names))
    for name, problem in zip(names, problems):
        if problem is not None:
            raise CodeCacheCorruptError(f"code cache shard {path / name} is unusable: {problem}; "
                                        f"{_rebuild_hint(path, info)}")


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
    info_path = path / CACHE_INFO
    if not info_path.is_file():
        partial = " (pretokenize did not finish: rerun it to resume)" if (path / STATE_FILE).exists() else ""
        raise FileNotFoundError(f"no {CACHE_INFO} in {path}; not a finished code cache{partial}")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise CodeCacheCorruptError(f"{info_path}: not valid JSON (line {err.lineno}, column {err.colno}: "
                                    f"{err.msg}); {_rebuild_hint(path, {})}") from None
    if info.get("format_version") != CACHE_FORMAT_VERSION:
        raise CodeCacheMismatchError(
            f"code cache {path} has format version {info.get('format_version')}, this UniMM reads version "
            f"{CACHE_FORMAT_VERSION} (which records tokenizer weights and shard checksums); rebuild it into a new "
            f"--output_dir with scripts/pretokenize.py")
    if expected_hash is not None:
        _check_identity(path, info, expected_hash, allow_weights_mismatch)
    if verify:
        verify_code_cache(path, info)
    shards = []
    for name in info["shards"]:
        try:
            shards.append(datasets.Dataset.from_file(str(path / name)))
        except (OSError, pa.ArrowException) as err:
            raise CodeCacheCorruptError(f"code cache shard {path / name} cannot be read ({err}); "
                                        f"{_rebuild_hint(path, info)}") from None
    dataset = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    return CodeCache(path, info, dataset)


# ------------------------------------------------------------------------------------------------ program glue


@dataclass
class PretokenizeConfig:
    """Arguments of `scripts/pretokenize.py`."""

    data: str = config_field(None, "Image-text records (folder, jsonl/json, parquet, save_to_disk dir, webdataset "
                             "tar glob) or, with data_format=llava, a LLaVA conversation JSON.")
    tokenizer_path: str = config_field(None, "Directory of a trained visual tokenizer (unimm.tokenizer.load_tokenizer).")
    output_dir: str = config_field(None, "Cache directory (Arrow shards + cache_info.json); rerun with the same to resume.")
    data_format: str = config_field("pairs", "pairs: cache keyed by record id, with captions; llava: the distinct images "
                                       "of a LLaVA JSON, keyed by the image path as written in the file.")
    image_folder: str | None = config_field(None, "LLaVA only: folder the image paths are relative to (default: the "
                                            "JSON file's folder).")
    image_key: str = config_field("image", "Column / field holding the image (pairs).")
    allow_outside_image_folder: bool = config_field(False, "Let record image paths leave their folder (absolute paths, "
                                                     "`..`, symlinks); off: such records are skipped and counted.")
    text_key: str | None = config_field(None, "Column holding the caption (pairs); default: text, caption or txt.")
    batch_size: int = config_field(32, "Images per tokenizer forward pass.")
    shard_size: int = config_field(1024, "Records per Arrow shard (the unit of resumption and of multi-GPU sharding).")
    num_workers: int = config_field(2, "DataLoader workers decoding images.")
    max_bad_fraction: float = config_field(0.01, "Fraction of unreadable images tolerated before stopping.")
    dtype: str = config_field("float32", "Tokenizer weight dtype on GPU: float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        for name in ("data", "tokenizer_path", "output_dir"):
            if getattr(self, name) is None:
                raise ValueError(f"pretokenize needs --{name}")
        if self.data_format not in ("pairs", "llava"):
            raise ValueError(f"data_format must be 'pairs' or 'llava', got {self.data_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def llava_image_records(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                        allow_outside_folder: bool = False) -> Any:
    """The distinct images of a LLaVA file as records `id` (path as written, the cache key) and `image` (resolved).
    An image path that leaves the folder (`..`, a symlink, an absolute path elsewhere) gets no image, so it is
    skipped and counted like a missing one, with a warning naming the records that use it, unless
    `allow_outside_folder`."""
    import datasets

    from unimm.data.images import ImageOutsideFolderError, resolve_image_path
    from unimm.data.sources import read_llava_json

    folder = Path(image_folder) if image_folder is not None else Path(path).resolve().parent
    users: dict[str, list[str]] = {}
    records = read_llava_json(path)
    for sample_id, refs in zip(records["id"], records["images"]):
        for ref in refs:
            users.setdefault(ref, []).append(sample_id)
    refs = sorted(users)
    images: list[str | None] = []
    for ref in refs:
        try:
            images.append(resolve_image_path(ref, folder, allow_outside_folder))
        except ImageOutsideFolderError as err:
            logger.warning("%s: skipping the image of record(s) %s: %s", path, ", ".join(users[ref][:5]), err)
            images.append(None)
    return datasets.Dataset.from_dict({"id": refs, "image": images},
                                      features=datasets.Features({"id": datasets.Value("string"),
                                                                  "image": datasets.Value("string")}))


def rebuild_command(config: PretokenizeConfig) -> str:
    """The `scripts/pretokenize.py` command line that (re)builds the cache `config` describes."""
    args = ["python", "scripts/pretokenize.py", "--data", config.data, "--tokenizer_path", config.tokenizer_path,
            "--output_dir", config.output_dir, "--shard_size", str(config.shard_size)]
    if config.data_format != "pairs":
        args += ["--data_format", config.data_format]
    for name in ("image_folder", "text_key"):
        if getattr(config, name) is not None:
            args += [f"--{name}", getattr(config, name)]
    if config.image_key != "image":
        args += ["--image_key", config.image_key]
    if config.allow_outside_image_folder:
        args += ["--allow_outside_image_folder", "true"]
    return shlex.join(str(a) for a in args)


def run_pretokenize(config: PretokenizeConfig, show_progress: bool = True) -> dict | None:
    """Pretokenize with every process of the current `accelerate` launch; the main process writes
    `cache_info.json` once all shards are done and returns it (other processes return None)."""
    from unimm.data.images import read_image_records
    from unimm.tokenizer import load_tokenizer
    from unimm.utils.runtime import make_accelerator, resolve_dtype

    accelerator = make_accelerator()  # a multi-process launch on a CPU-only machine: gloo ranks
    dtype = resolve_dtype(name=config.dtype)
    with model_folder("tokenizer_path", config.tokenizer_path, "a UniMM visual tokenizer"):
        tokenizer = load_tokenizer(config.tokenizer_path).eval()
    weights_hash = tokenizer_weights_hash(tokenizer)  # of the weights as saved, before any cast
    tokenizer = tokenizer.to(accelerator.device)
    if dtype != torch.float32 and accelerator.device.type != "cpu":
        tokenizer = tokenizer.to(dtype)
    require_path("data", config.data)
    if config.data_format == "llava":
        records = llava_image_records(config.data, config.image_folder, config.allow_outside_image_folder)
    else:
        with json_source_errors(config.data):
            records = read_image_records(config.data, image_key=config.image_key, text_key=config.text_key,
                                         allow_outside_folder=config.allow_outside_image_folder)
    pretokenize(records, tokenizer, config.output_dir, batch_size=config.batch_size, shard_size=config.shard_size,
                num_workers=config.num_workers, device=accelerator.device, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, max_bad_fraction=config.max_bad_fraction,
                source=str(config.data), show_progress=show_progress and accelerator.is_local_main_process,
                weights_hash=weights_hash)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    info = finalize_code_cache(config.output_dir, tokenizer, max_bad_fraction=config.max_bad_fraction,
                               rebuild_command=rebuild_command(config))
    logger.info("code cache %s: %d codes written, %d skipped", config.output_dir, info["num_codes_written"],
                info["num_skipped"])
    return info
