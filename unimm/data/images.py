"""Images in, tensors out: decoding with explicit errors, record readers for the formats image collections come
in (image folders with captions, jsonl/json, parquet, `save_to_disk` directories, webdataset tar shards), a
PIL-only resize/crop/normalise transform, and a dataset/collate pair that skips bad images instead of crashing.

Every reader returns a Hugging Face `Dataset` (or `IterableDataset` when `streaming=True`) with the columns
`id` (str), `image` (a path string, raw bytes, or the `{"bytes", "path"}` dict of an undecoded `datasets.Image`
column) and, when captions exist, `text`. Images are decoded only by `load_image`, so a bad file becomes a
counted, skippable `ImageLoadError` naming the sample, never a crash inside `datasets`.
"""

from __future__ import annotations

import glob as globlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from unimm.data.bad_samples import BadSampleTracker, TooManyBadSamplesError
from unimm.tokenizer.transform import IMAGE_ASPECTS, ImageTransform  # re-exported: the tokenizer floor owns it
from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_ASPECTS",
    "IMAGE_EXTENSIONS",
    "BadSampleTracker",
    "ImageDataset",
    "ImageLoadError",
    "ImageOutsideFolderError",
    "ImageTransform",
    "TooManyBadSamplesError",
    "collate_images",
    "load_image",
    "read_image_records",
    "resolve_image_path",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_KEYS = ("text", "caption", "txt")  # looked up in this order when `text_key` is None
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class ImageLoadError(UserError, ValueError):
    """An image could not be read or decoded; the message names the sample id and the path or reason."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"file {os.fspath(source)}"
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    if isinstance(source, dict):
        return f"file {source.get('path')}" if source.get("path") else "embedded bytes"
    return type(source).__name__


def load_image(source: str | os.PathLike | bytes | Image.Image | dict, sample_id: str) -> Image.Image:
    """Decode `source` fully into an RGB PIL image.

    `source` is a path, encoded bytes, a PIL image, or a `{"bytes", "path"}` dict (an undecoded `datasets.Image`
    value). The whole image is decoded here (`Image.load`), so truncated or corrupt files fail now, with an
    `ImageLoadError` naming `sample_id`, rather than later inside a transform or a worker process.
    """
    if source is None:
        raise ImageLoadError(f"sample {sample_id}: no image (the image field is empty)")
    what = _describe(source)
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ImageLoadError(f"sample {sample_id}: image entry has neither bytes nor a path")
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                raise ImageLoadError(f"sample {sample_id}: image path is a folder, not an image file: {path}")
            if not path.is_file():
                raise ImageLoadError(f"sample {sample_id}: image file not found: {path}")
            image = Image.open(path)
        else:
            raise ImageLoadError(f"sample {sample_id}: unsupported image source of type {type(source).__name__}")
        image.load()  # decode everything now: truncated data raises here
        # Phone photos store their orientation in EXIF: the pixels are sideways until it is applied.
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = _to_8bit(image)
        if image.mode != "RGB":
            # Palette/LA images with transparency convert through RGBA so the alpha is dropped, not garbled.
            if image.mode in ("P", "LA", "PA") or (image.mode == "L" and "transparency" in image.info):
                image = image.convert("RGBA")
            image = image.convert("RGB")
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"sample {sample_id}: cannot decode image ({what}): {err}") from err
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"sample {sample_id}: image ({what}) has zero size {image.size}")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit grey, scaled by its range rather than clipped
    (PIL's own conversion clips every value above 255 to white): 16-bit data by 65535 / 255, integers that fit
    8 bits as they are, floats in [0, 1] by 255, anything else from its minimum to its maximum."""
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled = values / 257.0
    elif image.mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------------------------------- readers


def _pick_text_key(columns: Sequence[str], text_key: str | None, source: str) -> str | None:
    if text_key is not None:
        if text_key not in columns:
            raise KeyError(f"{source}: text_key {text_key!r} not found; columns are {list(columns)}")
        return text_key
    return next((key for key in TEXT_KEYS if key in columns), None)


class ImageOutsideFolderError(ImageLoadError):
    """A record's image path resolves (through `..` or a symlink, or being absolute) outside its image folder."""


def resolve_image_path(value: str, folder: str | os.PathLike, allow_outside: bool = False) -> str:
    """`value` (a path as written in a record: relative to `folder`, or absolute) as a path to open. Unless
    `allow_outside`, a path whose real location (`..` and symlinks resolved) is not inside `folder` raises
    `ImageOutsideFolderError`, so a record cannot make a training job read files elsewhere on the machine."""
    folder = Path(folder)
    path = Path(value) if os.path.isabs(value) else folder / value
    if not allow_outside and not path.resolve().is_relative_to(folder.resolve()):
        raise ImageOutsideFolderError(f"image path {value!r} resolves to {path.resolve()}, outside the image folder "
                                      f"{folder} (allow_outside_image_folder permits such paths)")
    return str(path)


def _resolve_path(value: Any, base_dir: Path, sample_id: str, allow_outside: bool) -> Any:
    """A local path of a record resolved against `base_dir`; None (skipped and counted as a record without an
    image when loaded) if it leaves `base_dir`. URLs and non-path values pass through."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    try:
        return resolve_image_path(value, base_dir, allow_outside)
    except ImageOutsideFolderError as err:
        logger.warning("sample %s: skipping its image: %s", sample_id, err)
        return None


def _normalise_columns(dataset: Any, image_key: str, text_key: str | None, id_key: str, source: str,
                       base_dir: Path | None, allow_outside: bool = False) -> Any:
    """Rename to `id`/`image`/`text`, keep image values undecoded, make ids strings (or `<stem>-<row>`)."""
    import datasets

    columns = dataset.column_names
    if columns is None:  # a streaming dataset whose features are not resolved yet: look at the first record
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"{source}: no records")
        columns = list(first)
    if image_key not in columns:
        raise KeyError(f"{source}: image_key {image_key!r} not found; columns are {columns}")
    text_col = _pick_text_key(columns, text_key, source)
    features = dataset.features
    if features is not None and isinstance(features.get(image_key), datasets.Image):
        dataset = dataset.cast_column(image_key, datasets.Image(decode=False))
    stem = Path(source.rstrip("/")).name.split("*")[0] or "record"
    has_id = id_key in columns

    def convert(example: dict, index: int) -> dict:
        image = example[image_key]
        sample_id = str(example[id_key]) if has_id and example[id_key] is not None else f"{stem}-{index}"
        if base_dir is not None:
            image = _resolve_path(image, base_dir, sample_id, allow_outside)
            if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
                image = {"bytes": None, "path": _resolve_path(image["path"], base_dir, sample_id, allow_outside)}
        out = {"id": sample_id, "image": image}
        if text_col is not None:
            out["text"] = example[text_col]
        return out

    return dataset.map(convert, with_indices=True, remove_columns=list(columns))


def _read_image_folder(folder: Path, split: str, streaming: bool) -> Any:
    import datasets

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    data: dict[str, list] = {"id": [str(p.relative_to(folder).with_suffix("")) for p in paths],
                             "image": [str(p) for p in paths]}
    captions = [p.with_suffix(".txt") for p in paths]
    if any(c.is_file() for c in captions):
        data["text"] = [c.read_text().strip() if c.is_file() else None for c in captions]
    dataset = datasets.Dataset.from_dict(data, split=split)
    return dataset.to_iterable_dataset() if streaming else dataset


def _expand(source: str) -> list[str]:
    files = sorted(globlib.glob(source)) if any(ch in source for ch in "*?[") else [source]
    if not files:
        raise FileNotFoundError(f"no files match {source}")
    return files


def read_image_records(source: str | os.PathLike, image_key: str = "image", text_key: str | None = None,
                       split: str = "train", streaming: bool = False, id_key: str = "id",
                       cache_dir: str | None = None, allow_outside_folder: bool = False) -> Any:
    """Read image(-text) records from `source` into a `datasets.Dataset` (`IterableDataset` if `streaming`)
    with columns `id`, `image` and, when captions are present, `text`.

    Formats, chosen from `source`:
    - a folder of images (recursively), captions from same-stem `.txt` files when present; ids are the
      relative paths without extension;
    - a folder written by `Dataset.save_to_disk`;
    - `.jsonl` / `.json` (paths relative to the file's folder), `.parquet` (binary, path or `datasets.Image`
      columns); a glob of such files;
    - webdataset `.tar` shards (a file, a glob like `shards/*.tar`, or a folder of `.tar` files): the first
      image extension in each sample is the image, `txt` the caption, `__key__` the id.

    `text_key=None` uses the first of `text`, `caption`, `txt` that exists; rows without an `id_key` column
    get `<file stem>-<row>` ids. `cache_dir` is passed to `datasets.load_dataset` (its Arrow cache).
    Image paths in jsonl/json/parquet/save_to_disk records must stay inside the records' folder (after `..` and
    symlinks); a record whose path leaves it keeps no image (skipped and counted when loaded, with a warning
    naming it) unless `allow_outside_folder`.
    """
    import datasets

    source = os.fspath(source)
    path = Path(source)
    if path.is_dir():
        if any((path / marker).exists() for marker in _DATASET_MARKERS):
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise KeyError(f"{source}: split {split!r} not found; splits are {list(loaded)}")
                loaded = loaded[split]
            if streaming:
                loaded = loaded.to_iterable_dataset()
            return _normalise_columns(loaded, image_key, text_key, id_key, source, base_dir=path,
                                      allow_outside=allow_outside_folder)
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars:
            return _read_webdataset(tars, source, split, streaming, text_key, cache_dir)
        return _read_image_folder(path, split, streaming)

    files = _expand(source)
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes == {".tar"}:
        return _read_webdataset(files, source, split, streaming, text_key, cache_dir)
    if suffixes <= {".jsonl", ".json"}:
        builder = "json"
    elif suffixes == {".parquet"}:
        builder = "parquet"
    else:
        raise ValueError(f"{source}: unsupported image-record format {sorted(suffixes)}; expected an image folder, "
                         "a save_to_disk folder, .jsonl/.json, .parquet or webdataset .tar shards")
    dataset = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                    cache_dir=cache_dir)
    base_dirs = {Path(f).resolve().parent for f in files}
    if len(base_dirs) > 1:
        raise ValueError(f"{source}: files span several folders {sorted(map(str, base_dirs))}; relative image "
                         "paths would be ambiguous. Read each folder separately and concatenate.")
    return _normalise_columns(dataset, image_key, text_key, id_key, source, base_dir=base_dirs.pop(),
                              allow_outside=allow_outside_folder)


def _read_webdataset(files: list[str], source: str, split: str, streaming: bool, text_key: str | None,
                     cache_dir: str | None) -> Any:
    import datasets

    dataset = datasets.load_dataset("webdataset", data_files={split: files}, split=split, streaming=streaming,
                                    cache_dir=cache_dir)
    columns = dataset.column_names or list(next(iter(dataset)))
    image_cols = [c for c in columns if "." + c.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not image_cols:
        raise KeyError(f"{source}: no image field ({', '.join(IMAGE_EXTENSIONS)}) in the webdataset samples; "
                       f"fields are {columns}")
    if text_key is None and "txt" not in columns:
        text_key = next((c for c in columns if c in TEXT_KEYS), None)
    return _normalise_columns(dataset, image_cols[0], text_key or ("txt" if "txt" in columns else None),
                              "__key__", source, base_dir=None)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over image records (a `datasets.Dataset` or a list of dicts with `id` and `image`).

    `__getitem__` never raises for a bad image: it returns `pixel_values=None` and the error text, so the
    collator can skip and count it (see `collate_images` and `BadSampleTracker`).
    """

    def __init__(self, records: Any, transform: ImageTransform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample_id = str(record.get("id", index))
        try:
            image = load_image(record.get("image"), sample_id)
            return {"id": sample_id, "pixel_values": self.transform(image), "error": None}
        except ImageLoadError as err:
            return {"id": sample_id, "pixel_values": None, "error": str(err)}


def collate_images(items: Sequence[dict]) -> dict:
    """Stack the good images of `items` (from `ImageDataset`) and list the skipped ones.

    Returns `pixel_values` [B_ok, 3, H, W] (shape [0, 3, 0, 0] when every item was bad), `ids` of the stacked
    images in order, and `skipped` as `(id, error)` pairs.
    """
    good = [item for item in items if item["pixel_values"] is not None]
    skipped = [(item["id"], item["error"]) for item in items if item["pixel_values"] is None]
    if good:
        pixel_values = torch.stack([item["pixel_values"] for item in good])
    else:
        pixel_values = torch.empty((0, 3, 0, 0))
    return {"pixel_values": pixel_values, "ids": [item["id"] for item in good], "skipped": skipped}

