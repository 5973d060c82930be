"""The pretokenize program (`scripts/pretokenize.py`): run a visual tokenizer once over a dataset's images and
write their codes as a code cache (`unimm.data.code_cache` describes the format).

Every process of a launch (`accelerate launch`, `torchrun`, across nodes) encodes its own shards in parallel:
shard `s` holds records `[s * shard_size, (s + 1) * shard_size)` and belongs to process `s % num_processes`
(`pretokenize`); or, with `--input_shards` (`pretokenize_shards`), shard `s` holds the records of the input's
webdataset or Parquet file `s`, which only process `s % num_processes` opens.
A shard's `.json` is written after its Arrow file, so finished shards survive an interruption and a rerun of the
same command encodes only what is missing or damaged. Once every process is done, the shard records are
gathered over the process group and the first process of every node writes the manifest (`cache_info.json`),
so the cache is usable on nodes whose local disks hold only their own shards.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.code_cache import (
    CACHE_FORMAT_VERSION,
    STATE_FILE,
    CodeCacheMismatchError,
    codebook_spec_dict,
    finalize_code_cache,
    pretokenize_state,
    shard_meta_path,
    shard_name,
    shard_problem,
    shard_table,
    tokenizer_weights_hash,
    write_json_atomic,
    write_shard,
)
from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.utils.config import Alias, config_field
from unimm.utils.errors import json_source_errors, model_folder, require_path
from unimm.utils.runtime import DTYPES

logger = logging.getLogger(__name__)


@dataclass
class PretokenizeResult:
    """What one process did: shards written now, shards skipped because a previous run finished them, and the
    records (`.json` contents: counts, skipped ids, checksum) of all its shards, for the manifest."""

    written_shards: list[int]
    skipped_shards: list[int]
    num_shards: int
    shard_records: list[dict] = field(default_factory=list)


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
    spec = codebook_spec_dict(tokenizer)
    codes = {name: np.concatenate(groups[name]) if groups.get(name) else np.zeros((0, 0), np.int32)
             for name in spec or groups}
    meta = {"num_records": len(records), "num_written": len(ids), "skipped": skipped, "shapes": shapes}
    return shard_table(ids, texts, codes, spec), meta


def _check_state(out: Path, state: dict) -> None:
    """Refuse to resume a run that was started with other inputs (or by a UniMM writing another format); write
    the state when this process finds none (on its node's disk, when nodes do not share one)."""
    state_path = out / STATE_FILE
    if not state_path.exists():
        write_json_atomic(state_path, state)
        return
    previous = json.loads(state_path.read_text())
    if previous == state:
        return
    if previous.get("format_version") != CACHE_FORMAT_VERSION:
        raise CodeCacheMismatchError(
            f"{out} holds a pretokenize run of cache format {previous.get('format_version')} (int32 codes); this "
            f"UniMM writes format {CACHE_FORMAT_VERSION}, and one cache cannot mix both: finish that run with the "
            f"UniMM that started it, or pretokenize into a new output_dir")
    raise CodeCacheMismatchError(f"{out} holds a pretokenize run started with {previous}, but this run has "
                                 f"{state}; use another out_dir or delete the old cache")


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
    Call `finalize_code_cache` once every process is done (`run_pretokenize` gathers every process's
    `shard_records` and does it on each node). `weights_hash` is `tokenizer_weights_hash(tokenizer)` when the
    caller already has it (or took it before casting the tokenizer to a lower precision).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    num_records = len(records)
    _check_state(out, pretokenize_state(tokenizer, weights_hash, num_records, shard_size, source))
    num_shards = max(1, -(-num_records // shard_size))
    mine = [s for s in range(num_shards) if s % num_processes == process_index]
    finished = {s: record for s in mine if (record := _finished_shard(out, s)) is not None}
    todo = [s for s in mine if s not in finished]
    transform = ImageTransform.for_tokenizer(tokenizer)
    tracker = BadSampleTracker(max_bad_fraction=max_bad_fraction, name=f"pretokenize[{process_index}]")
    total = sum(min(shard_size, num_records - s * shard_size) for s in todo)
    progress = tqdm(total=total, desc=f"pretokenize (process {process_index})", unit="img",
                    disable=not show_progress)
    if finished:
        logger.info("process %d: %d shard(s) already finished, %d to do", process_index, len(finished), len(todo))
    written = {}
    for shard in todo:
        start, stop = shard * shard_size, min(num_records, (shard + 1) * shard_size)
        table, meta = _encode_shard(records.select(range(start, stop)), tokenizer, transform, batch_size,
                                    num_workers, device, tracker, progress)
        written[shard] = write_shard(out, shard, start, stop, table, meta)
    progress.close()
    tracker.check(final=True)
    records_by_shard = {**finished, **written}
    return PretokenizeResult(written_shards=todo, skipped_shards=sorted(finished), num_shards=num_shards,
                             shard_records=[records_by_shard[s] for s in mine])


class _ListingTracker(BadSampleTracker):
    """A tracker that also keeps every bad sample, for the shard records' skipped lists."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.all_bad: list[list[str]] = []

    def record_bad(self, sample_id: str, reason: str) -> None:
        self.all_bad.append([str(sample_id), str(reason)])
        super().record_bad(sample_id, reason)


def pretokenize_shards(source: Any, tokenizer: Any, out_dir: str | os.PathLike, batch_size: int = 32,
                       device: torch.device | str = "cpu", process_index: int = 0, num_processes: int = 1,
                       max_bad_fraction: float = 0.01, source_name: str | None = None, show_progress: bool = True,
                       weights_hash: str | None = None) -> PretokenizeResult:
    """Encode a sharded image source (`unimm.data.shards.WebDatasetShards` or `ParquetShards`: datasets too large to
    list up front) into the code cache in `out_dir`: output shard i holds the records of input shard i, and input
    shard i belongs to process `i % num_processes`, which reads no other file, so a node needs only its own
    input shards on its disk. Resumes like `pretokenize` (finished shards are kept); bad images are skipped and
    listed in their shard's record."""
    from tqdm.auto import tqdm

    from unimm.data.shards import POSITION, encode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    inputs = source.shards()
    _check_state(out, pretokenize_state(tokenizer, weights_hash, None, None, source_name,
                                        input_shards=[os.path.basename(shard) for shard in inputs]))
    mine = [s for s in range(len(inputs)) if s % num_processes == process_index]
    finished = {s: record for s in mine if (record := _finished_shard(out, s)) is not None}
    tracker = _ListingTracker(max_bad_fraction=max_bad_fraction, name=f"pretokenize[{process_index}]")
    source.tracker = tracker
    encoded = encode(source, tokenizer, batch_size=batch_size, device=device)
    spec = codebook_spec_dict(tokenizer)
    progress = tqdm(desc=f"pretokenize (process {process_index})", unit="img", disable=not show_progress)
    written = {}
    for shard in (s for s in mine if s not in finished):
        ids, texts, groups, shapes, seen, bad_before = [], [], {}, {}, 0, len(tracker.all_bad)
        for record in encoded.read(inputs[shard]):
            ids.append(str(record["id"]))
            texts.append(record.get("text"))
            for name, codes in record["codes"].items():
                groups.setdefault(name, []).append(codes.reshape(-1))
                shapes[name] = list(codes.shape)
            seen = record[POSITION] + 1
            progress.update(1)
        skipped = tracker.all_bad[bad_before:]
        codes = {name: np.stack(groups[name]) if groups.get(name) else np.zeros((0, 0), np.int32)
                 for name in spec or groups}
        meta = {"num_records": max(seen, len(ids) + len(skipped)), "num_written": len(ids), "skipped": skipped,
                "shapes": shapes, "input_shard": inputs[shard]}
        written[shard] = write_shard(out, shard, None, None, shard_table(ids, texts, codes, spec), meta)
    progress.close()
    tracker.check(final=True)
    records_by_shard = {**finished, **written}
    return PretokenizeResult(written_shards=sorted(written), skipped_shards=sorted(finished), num_shards=len(inputs),
                             shard_records=[records_by_shard[s] for s in mine])


def _finished_shard(out: Path, shard: int) -> dict | None:
    """The record of `shard` when it was finished and its Arrow file is still what was written (None: it must be
    (re-)encoded)."""
    meta_path = shard_meta_path(out, shard)
    if not meta_path.exists():
        return None
    record = json.loads(meta_path.read_text())
    problem = shard_problem(out / f"{shard_name(shard)}.arrow", record.get("checksum"))
    if problem is not None:
        logger.warning("%s: %s; re-encoding it", out / f"{shard_name(shard)}.arrow", problem)
        return None
    return record


# ------------------------------------------------------------------------------------------------ program glue


@dataclass
class PretokenizeConfig:
    """Arguments of `scripts/pretokenize.py`."""

    config_aliases = (Alias("tokenizer_path", "visual_tokenizer_path"),)

    data: str = config_field(None, "Image-text records (folder, jsonl/json, parquet, save_to_disk dir, webdataset "
                             "tar glob) or, with data_format=llava, a LLaVA conversation JSON.")
    visual_tokenizer_path: str = config_field(None, "Directory of a trained visual tokenizer "
                                              "(unimm.tokenizer.load_tokenizer); --tokenizer_path is a deprecated alias.")
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
    input_shards: bool = config_field(False, "Read --data's webdataset .tar or .parquet files as shards: output "
                                      "shard i holds input file i's records and each process reads only its own "
                                      "files (no index of all records first; for very large datasets). "
                                      "--shard_size and --num_workers do not apply.")
    dtype: str = config_field("float32", "Tokenizer weight dtype on GPU: float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        for name in ("data", "visual_tokenizer_path", "output_dir"):
            if getattr(self, name) is None:
                raise ValueError(f"pretokenize needs --{name}")
        if self.data_format not in ("pairs", "llava"):
            raise ValueError(f"data_format must be 'pairs' or 'llava', got {self.data_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.input_shards and self.data_format != "pairs":
            raise ValueError("input_shards reads image-text pairs (webdataset or parquet), not data_format=llava")


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
    args = ["python", "scripts/pretokenize.py", "--data", config.data, "--visual_tokenizer_path",
            config.visual_tokenizer_path,
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
    if config.input_shards:
        args += ["--input_shards", "true"]
    return shlex.join(str(a) for a in args)


def _input_shards(config: PretokenizeConfig) -> Any:
    """The shard source `--input_shards` reads: webdataset tars or Parquet files (a glob, a folder or a file)."""
    from unimm.data.shards import ParquetShards, WebDatasetShards, expand_files

    files = expand_files(config.data, (".tar", ".parquet"), "webdataset or parquet")
    suffixes = {Path(file).suffix.lower() for file in files}
    if suffixes == {".tar"}:
        return WebDatasetShards(files, text_key=config.text_key, name=str(config.data))
    if suffixes == {".parquet"}:
        return ParquetShards(files, image_key=config.image_key, text_key=config.text_key, name=str(config.data),
                             image_folder=config.image_folder)
    raise ValueError(f"--input_shards reads webdataset .tar or .parquet files; {config.data} holds {sorted(suffixes)}")


def run_pretokenize(config: PretokenizeConfig, show_progress: bool = True) -> dict | None:
    """Pretokenize with every process of the current launch (`accelerate launch`, `torchrun`, one node or many),
    each encoding its own shards. Once all are done, every process's shard records are gathered and the first
    process of each node writes the manifest `cache_info.json` into its `output_dir` (nodes without a shared
    filesystem each get the whole manifest beside their own shards). Returns the manifest on the main process,
    None on the others."""
    from accelerate.utils import gather_object

    from unimm.data.images import read_image_records
    from unimm.tokenizer import load_tokenizer
    from unimm.utils.runtime import make_accelerator, resolve_dtype

    accelerator = make_accelerator()  # a multi-process launch on a CPU-only machine: gloo ranks
    dtype = resolve_dtype(name=config.dtype)
    with model_folder("visual_tokenizer_path", config.visual_tokenizer_path, "a UniMM visual tokenizer"):
        tokenizer = load_tokenizer(config.visual_tokenizer_path).eval()
    weights_hash = tokenizer_weights_hash(tokenizer)  # of the weights as saved, before any cast
    tokenizer = tokenizer.to(accelerator.device)
    if dtype != torch.float32 and accelerator.device.type != "cpu":
        tokenizer = tokenizer.to(dtype)
    progress = show_progress and accelerator.is_local_main_process
    ranks = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes}
    if config.input_shards:
        result = pretokenize_shards(_input_shards(config), tokenizer, config.output_dir, batch_size=config.batch_size,
                                    device=accelerator.device, max_bad_fraction=config.max_bad_fraction,
                                    source_name=str(config.data), show_progress=progress, weights_hash=weights_hash,
                                    **ranks)
    else:
        require_path("data", config.data)
        if config.data_format == "llava":
            records = llava_image_records(config.data, config.image_folder, config.allow_outside_image_folder)
        else:
            with json_source_errors(config.data):
                records = read_image_records(config.data, image_key=config.image_key, text_key=config.text_key,
                                             allow_outside_folder=config.allow_outside_image_folder)
        result = pretokenize(records, tokenizer, config.output_dir, batch_size=config.batch_size,
                             shard_size=config.shard_size, num_workers=config.num_workers, device=accelerator.device,
                             max_bad_fraction=config.max_bad_fraction, source=str(config.data),
                             show_progress=progress, weights_hash=weights_hash, **ranks)
    # The gather is the barrier: the manifest is written once every shard exists.
    shard_records = gather_object(result.shard_records) if accelerator.num_processes > 1 else result.shard_records
    if not accelerator.is_local_main_process:
        return None
    info = finalize_code_cache(config.output_dir, tokenizer, max_bad_fraction=config.max_bad_fraction,
                               rebuild_command=rebuild_command(config), shard_records=shard_records)
    if not accelerator.is_main_process:
        return None
    logger.info("code cache %s: %d codes written, %d skipped", config.output_dir, info["num_codes_written"],
                info["num_skipped"])
    return info
