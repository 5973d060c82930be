"""Record image paths stay inside their folder (`..`, symlinks and absolute paths elsewhere are skipped and
counted, naming the record, unless explicitly allowed), and images of odd modes and sizes load as RGB."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from unimm.data.images import (
    ImageDataset,
    ImageOutsideFolderError,
    ImageTransform,
    collate_images,
    load_image,
    read_image_records,
    resolve_image_path,
)


@pytest.fixture
def escaping_records(tmp_path):
    """A jsonl in `data/` whose records point inside, up and out, through a symlink, and to an absolute path."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(data / "inside.png")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(elsewhere / "secret.png")
    (data / "sub").mkdir()
    (data / "link.png").symlink_to(elsewhere / "secret.png")
    rows = [{"id": "good", "image": "inside.png"},
            {"id": "good-dotdot", "image": "sub/../inside.png"},  # `..` that stays inside is fine
            {"id": "dotdot", "image": "../elsewhere/secret.png"},
            {"id": "symlink", "image": "link.png"},
            {"id": "absolute", "image": str(elsewhere / "secret.png")},
            {"id": "absolute-inside", "image": str(data / "inside.png")}]
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _loaded_ids(records) -> tuple[list[str], list[str]]:
    batch = collate_images([ImageDataset(records, ImageTransform(8))[i] for i in range(len(records))])
    return batch["ids"], [sample_id for sample_id, _ in batch["skipped"]]


def test_record_paths_leaving_the_folder_are_skipped_and_named(escaping_records, caplog):
    with caplog.at_level(logging.WARNING, logger="unimm.data.images"):
        records = read_image_records(escaping_records / "records.jsonl", cache_dir=str(escaping_records / "hf"))
    loaded, skipped = _loaded_ids(records)
    assert loaded == ["good", "good-dotdot", "absolute-inside"]
    assert skipped == ["dotdot", "symlink", "absolute"]
    for sample_id in ("dotdot", "symlink", "absolute"):
        assert f"sample {sample_id}: skipping its image" in caplog.text
    assert "outside the image folder" in caplog.text


def test_allow_outside_folder_loads_every_record(escaping_records):
    records = read_image_records(escaping_records / "records.jsonl", cache_dir=str(escaping_records / "hf2"),
                                 allow_outside_folder=True)
    loaded, skipped = _loaded_ids(records)
    assert skipped == [] and len(loaded) == 6


def test_resolve_image_path(escaping_records):
    assert resolve_image_path("inside.png", escaping_records) == str(escaping_records / "inside.png")
    with pytest.raises(ImageOutsideFolderError, match=r"'link.png' resolves to .*secret.png, outside the image"):
        resolve_image_path("link.png", escaping_records)
    assert resolve_image_path("../elsewhere/secret.png", escaping_records, allow_outside=True).endswith("secret.png")


def test_conversation_images_leaving_the_folder_are_bad_records(escaping_records):
    from unimm.data.sequence import SampleError
    from unimm.data.tasks import PixelImages

    pixels = PixelImages(escaping_records, ImageTransform(8), num_positions=4)
    assert pixels("inside.png", "ok").pixel_values.shape == (3, 8, 8)
    with pytest.raises(SampleError, match=r"conv-7.*outside the image folder"):
        pixels("../elsewhere/secret.png", "conv-7")
    allowed = PixelImages(escaping_records, ImageTransform(8), num_positions=4, allow_outside_folder=True)
    assert allowed("link.png", "conv-8").pixel_values.shape == (3, 8, 8)


def test_llava_images_leaving_the_folder_get_no_image(escaping_records, caplog):
    from unimm.data.code_cache import llava_image_records

    turns = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}]
    llava = [{"id": "in", "image": "inside.png", "conversations": turns},
             {"id": "out", "image": "../elsewhere/secret.png", "conversations": turns}]
    (escaping_records / "llava.json").write_text(json.dumps(llava))
    with caplog.at_level(logging.WARNING, logger="unimm.data.code_cache"):
        records = llava_image_records(escaping_records / "llava.json")
    images = dict(zip(records["id"], records["image"]))
    assert images == {"inside.png": str(escaping_records / "inside.png"), "../elsewhere/secret.png": None}
    assert "record(s) out" in caplog.text
    assert llava_image_records(escaping_records / "llava.json", allow_outside_folder=True)["image"][0] is not None


@pytest.mark.parametrize("mode, size", [("RGBA", (9, 7)), ("CMYK", (9, 7)), ("L", (9, 7)), ("LA", (5, 5)),
                                        ("I;16", (6, 6)), ("RGB", (1, 1)), ("L", (8000, 8000))])
def test_odd_image_modes_and_sizes_become_rgb_tensors(tmp_path, mode, size):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new(mode, size).save(path, format=fmt)
    image = load_image(str(path), "odd")
    assert image.mode == "RGB" and image.size == size
    pixel_values = ImageTransform(16)(image)
    assert pixel_values.shape == (3, 16, 16) and torch.isfinite(pixel_values).all()
