"""Readers for conversation and text records (image-text pairs are read by `unimm.data.images.read_image_records`).

LLaVA JSON is read exactly as LLaVA ships it: a JSON list (or jsonl) of `{"id", "image"?, "conversations":
[{"from": "human"|"gpt", "value": ...}]}` with `<image>` placeholders in the human turns. Records are normalised
into fixed columns so one odd record cannot break Arrow's schema for the whole file: `id` (str), `images`
(list of image references, as written in the file), `conversations` (list of `{"from", "value"}` or None) and
`malformed` (the reason when the record could not be normalised; such records are skipped and counted later,
when a sample is built, with their id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unimm.data.sequence import ImageSlot, MalformedRecordError
from unimm.data.templates import ChatMessage
from unimm.utils.errors import InputFileError, invalid_json

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


def _utf8_text(path: Path) -> str:
    """The text of `path`, which must be UTF-8: a stray byte is an `InputFileError` naming file, line and column."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputFileError(f"{path}:{line}:{column}: not UTF-8 (byte 0x{raw[err.start]:02x}); data files must "
                             "be UTF-8 encoded") from None


def _iter_json_records(path: Path) -> Iterator[Any]:
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as err:  # one bad record, skipped and counted like invalid JSON
                    yield {"__malformed__": f"{path}:{line_number}:{err.start + 1}: not UTF-8 (byte "
                                            f"0x{raw_line[err.start]:02x})"}
                    continue
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield {"__malformed__": f"{path}:{line_number}:{err.colno}: invalid JSON ({err.msg})"}
        return
    text = _utf8_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise invalid_json(path, err) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA JSON file must hold a list of records, got {type(data).__name__}")
    yield from data


def normalise_llava_record(raw: Any, index: int, stem: str) -> dict:
    """One raw LLaVA record -> the fixed columns described in the module doc (never raises)."""
    if not isinstance(raw, dict):
        return {"id": f"{stem}-{index}", "images": [], "conversations": None,
                "malformed": f"record is a {type(raw).__name__}, not an object"}
    sample_id = str(raw["id"]) if raw.get("id") is not None else f"{stem}-{index}"
    out: dict[str, Any] = {"id": sample_id, "images": [], "conversations": None, "malformed": None}
    if "__malformed__" in raw:
        out["malformed"] = raw["__malformed__"]
        return out
    image = raw.get("image")
    if isinstance(image, str):
        out["images"] = [image]
    elif isinstance(image, list) and all(isinstance(i, str) for i in image):
        out["images"] = list(image)
    elif image is not None:
        out["malformed"] = f"'image' must be a path or a list of paths, got {type(image).__name__}"
        return out
    turns = raw.get("conversations")
    if turns is None:
        out["malformed"] = "record has no 'conversations'"
    elif not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns
    ):
        out["malformed"] = "'conversations' must be a list of {'from': str, 'value': str}"
    else:
        out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in turns]
    return out


# A LLaVA file at least this large is converted to Arrow once and memory-mapped on later reads: parsing costs ~0.2 s
# and ~8 MB of memory per MB of JSON per rank (benchmarks/startup.py: 10^6 records, 427 MB, 103 s and 3.4 GB), the
# Arrow file opens in milliseconds and its pages are shared. Smaller files are parsed each time.
LLAVA_ARROW_MIN_BYTES = 8 << 20
_LLAVA_ARROW_VERSION = 1  # bump when normalise_llava_record or the columns change: old conversions are not reused


def _llava_features() -> Any:
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "malformed": datasets.Value("string"),
    })


def _normalised_llava_records(path: Path) -> Iterator[dict]:
    name = path.name  # once: a Path per record cost more than the JSON parse
    for index, raw in enumerate(_iter_json_records(path)):
        yield normalise_llava_record(raw, index, name)


def read_llava_json(path: str | os.PathLike, streaming: bool = False, arrow_dir: str | os.PathLike | None = None,
                    arrow_min_bytes: int = LLAVA_ARROW_MIN_BYTES) -> Any:
    """Read a LLaVA conversation file (`.json` list or `.jsonl`) into a `datasets.Dataset` (an `IterableDataset`
    with `streaming=True`) with columns `id`, `images`, `conversations`, `malformed`.

    A file of `arrow_min_bytes` or more is converted once into an Arrow file in `arrow_dir` (default: the `datasets`
    cache, `HF_DATASETS_CACHE/unimm_llava`), named by the xxh3-128 of the JSON's bytes, so an edited file gets a new
    conversion; later reads (every rank, every run) memory-map it instead of parsing the JSON."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA conversation file not found: {path}")
    features = _llava_features()
    if streaming:
        return datasets.IterableDataset.from_generator(
            lambda file: _normalised_llava_records(Path(file)), features=features, gen_kwargs={"file": str(path)})
    if path.stat().st_size < arrow_min_bytes:
        return _llava_dataset(path, features)
    folder = Path(arrow_dir) if arrow_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "unimm_llava"
    return _llava_arrow(path, folder, features)


def _llava_dataset(path: Path, features: Any) -> Any:
    """The records in memory: one Arrow conversion of all rows (`Dataset.from_list` encodes row by row, ~10x
    slower at 10^5 records)."""
    import datasets
    import pyarrow as pa

    return datasets.Dataset(pa.Table.from_pylist(list(_normalised_llava_records(path)), schema=features.arrow_schema))


def _llava_arrow(path: Path, folder: Path, features: Any) -> Any:
    """The records memory-mapped from their Arrow conversion in `folder`, made now if missing or unreadable (written
    to a temporary file and renamed, so ranks converting at once never read a partial file)."""
    import logging

    import datasets
    import pyarrow as pa
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    # The file name is part of the key: records without an id are named after it.
    target = folder / f"{path.name}-v{_LLAVA_ARROW_VERSION}-{digest.hexdigest()}.arrow"
    if target.is_file():
        try:
            return datasets.Dataset.from_file(str(target))
        except (OSError, pa.ArrowException) as err:
            logging.getLogger(__name__).warning("%s: unreadable (%s); converting %s again", target, err, path)
    dataset = _llava_dataset(path, features)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        table = dataset.data.table
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=65536)
        os.replace(tmp, target)
    except OSError as err:
        logging.getLogger(__name__).warning("cannot write the Arrow conversion of %s to %s (%s); reading the JSON "
                                            "each time", path, folder, err)
        tmp.unlink(missing_ok=True)
        return dataset
    return datasets.Dataset.from_file(str(target))


def read_text_records(path: str | os.PathLike, text_key: str = "text") -> Any:
    """Text-only records (`id`, `text`) from a `.txt` file (one sample per non-empty line) or `.jsonl`/`.json`."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text data file not found: {path}")
    if path.suffix.lower() == ".txt":
        texts = [line.rstrip("\n") for line in _utf8_text(path).splitlines() if line.strip()]
    else:
        texts = []
        for index, raw in enumerate(_iter_json_records(path)):
            if isinstance(raw, dict) and "__malformed__" in raw:
                raise InputFileError(raw["__malformed__"])
            if not isinstance(raw, dict) or not isinstance(raw.get(text_key), str):
                raise ValueError(f"{path}: record {index} has no string field {text_key!r}")
            texts.append(raw[text_key])
    return datasets.Dataset.from_dict({"id": [f"{path.name}-{i}" for i in range(len(texts))], "text": texts})


def llava_messages(record: dict, image_slots: list[ImageSlot], system_prompt: str | None = None) -> list[ChatMessage]:
    """A normalised LLaVA record -> chat messages, with each `<image>` replaced by the next of `image_slots`.

    Raises `MalformedRecordError` (naming the id) for a malformed record, an unknown speaker, an empty answer (it
    would train the model to say nothing), `<image>` in an answer, or a placeholder count that differs from the
    number of images.
    """
    sample_id = record["id"]
    if record.get("malformed"):
        raise MalformedRecordError(sample_id, record["malformed"])
    turns = record.get("conversations")
    if not turns:
        raise MalformedRecordError(sample_id, "record has no 'conversations'")
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(image_slots):
        raise MalformedRecordError(sample_id, f"{placeholders} '<image>' placeholder(s) for {len(image_slots)} "
                                              "image(s)")
    messages = [ChatMessage("system", [system_prompt])] if system_prompt else []
    remaining = list(image_slots)
    for i, turn in enumerate(turns):
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise MalformedRecordError(sample_id, f"turn {i} is from unknown speaker {turn['from']!r}")
        value = turn["value"]
        if role == "assistant" and not value.strip():
            raise MalformedRecordError(sample_id, f"turn {i} ({turn['from']}) is an empty answer")
        if role != "user" and IMAGE_PLACEHOLDER in value:
            raise MalformedRecordError(sample_id, f"turn {i} ({turn['from']}) contains '<image>'; images may only "
                                                  "appear in human turns")
        parts: list[str | ImageSlot] = []
        for j, piece in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                parts.append(remaining.pop(0))
            if piece:
                parts.append(piece)
        messages.append(ChatMessage(role, parts))
    return messages


# ------------------------------------------------------------------------------------------------ length metadata


def arrow_column(records: Any, name: str) -> Any:
    """Column `name` of a `datasets.Dataset` as a `pyarrow.ChunkedArray` (memory-mapped when the dataset is: no
    Python object per record), or None when `records` is not Arrow-backed (a list of dicts)."""
    import datasets
    import pyarrow as pa

    if not isinstance(records, datasets.Dataset):
        return None
    column = records.with_format("arrow")[name]
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])


def text_bytes(records: Any, name: str = "text") -> np.ndarray:
    """UTF-8 bytes of each record's string column `name` (int64 [N], 0 for a null), read from the Arrow offsets."""
    import pyarrow.compute as pc

    column = arrow_column(records, name)
    if column is None:
        return np.array([len((record[name] or "").encode()) for record in records], dtype=np.int64)
    return pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def llava_length_stats(records: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per normalised LLaVA record (`read_llava_json`): UTF-8 bytes of all turn texts, number of turns and number
    of images (int64 [N] each; 0 for a malformed record), in a few vectorised Arrow passes."""
    import pyarrow.compute as pc

    conversations = arrow_column(records, "conversations")
    if conversations is None:
        turns = [record.get("conversations") or [] for record in records]
        return (np.array([sum(len(t["value"].encode()) for t in ts) for ts in turns], dtype=np.int64),
                np.array([len(ts) for ts in turns], dtype=np.int64),
                np.array([len(record.get("images") or []) for record in records], dtype=np.int64))
    totals, counts = [], []
    for chunk in conversations.chunks:
        parents = pc.list_parent_indices(chunk).to_numpy()
        value_bytes = pc.fill_null(pc.binary_length(pc.list_flatten(chunk).field("value")), 0)
        totals.append(np.bincount(parents, weights=value_bytes.to_numpy(zero_copy_only=False), minlength=len(chunk)))
        counts.append(np.bincount(parents, minlength=len(chunk)))
    total = np.concatenate(totals).astype(np.int64) if totals else np.zeros(0, np.int64)
    num_turns = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
    images = pc.fill_null(pc.list_value_length(arrow_column(records, "images")), 0)
    return total, num_turns, images.to_numpy(zero_copy_only=False).astype(np.int64)
