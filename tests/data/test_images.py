"""Image decoding, record readers, transform, skip-and-count collation and the bad-sample tracker."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unimm.data.images import (
    BadSampleTracker,
    ImageDataset,
    ImageLoadError,
    ImageTransform,
    TooManyBadSamplesError,
    collate_images,
    load_image,
    read_image_records,
)


def _image(color=(200, 30, 40), size=(12, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise_jpeg(size=(64, 64), seed=0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _encoded(Image.fromarray(array), "JPEG")


# ----------------------------------------------------------------------------------------------- load_image


def test_load_image_from_bytes_path_pil_and_dict(tmp_path):
    png = _encoded(_image(), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(png)
    for source in (png, str(path), path, _image(), {"bytes": png, "path": None}, {"bytes": None, "path": str(path)}):
        image = load_image(source, "s1")
        assert image.mode == "RGB" and image.size == (12, 8)
        assert image.getpixel((3, 3)) == (200, 30, 40)


def test_load_image_converts_palette_and_gray_to_rgb():
    gray = load_image(_encoded(_image(77, mode="L"), "PNG"), "g")
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    palette = load_image(_encoded(_image().convert("P"), "PNG"), "p")
    assert palette.mode == "RGB"


def test_corrupt_jpeg_bytes_raise_with_sample_id():
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4  # JPEG magic followed by junk
    for bad in (garbage, b"not an image at all"):
        with pytest.raises(ImageLoadError, match="sample bad-7"):
            load_image(bad, "bad-7")


def test_truncated_jpeg_file_fails_at_load_not_later(tmp_path):
    data = _noise_jpeg()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    # Image.open alone succeeds on a truncated JPEG (it reads only the header); load_image must decode fully.
    Image.open(path).close()
    with pytest.raises(ImageLoadError, match=r"sample t1: cannot decode image \(file .*truncated.jpg\)"):
        load_image(str(path), "t1")


def test_missing_file_names_id_and_path(tmp_path):
    missing = tmp_path / "nowhere" / "x.png"
    with pytest.raises(ImageLoadError, match=f"sample m3: image file not found: {missing}"):
        load_image(str(missing), "m3")
    with pytest.raises(ImageLoadError, match="sample m4: no image"):
        load_image(None, "m4")


# ------------------------------------------------------------------------------------------------- readers


def _write_folder(folder, n=3, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _image((10 * i, 0, 0)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"caption {i}\n")
    return folder


def _rows(dataset):
    return [dict(row) for row in dataset]


def test_read_image_folder_with_captions(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    records = read_image_records(folder)
    assert set(records.column_names) == {"id", "image", "text"}
    rows = _rows(records)
    assert [r["id"] for r in rows] == ["img0", "img1", "img2"]
    assert [r["text"] for r in rows] == ["caption 0", "caption 1", "caption 2"]
    assert load_image(rows[2]["image"], rows[2]["id"]).getpixel((0, 0)) == (20, 0, 0)
    no_caps = read_image_records(_write_folder(tmp_path / "plain", captions=False))
    assert set(no_caps.column_names) == {"id", "image"}


def test_read_jsonl_resolves_relative_paths_and_generates_ids(tmp_path):
    _write_folder(tmp_path / "data" / "images", captions=False)
    lines = [{"file": f"images/img{i}.png", "caption": f"c{i}"} for i in range(3)]
    jsonl = tmp_path / "data" / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))
    records = read_image_records(jsonl, image_key="file", cache_dir=str(tmp_path / "cache"))
    rows = _rows(records)
    assert [r["id"] for r in rows] == ["pairs.jsonl-0", "pairs.jsonl-1", "pairs.jsonl-2"]
    assert [r["text"] for r in rows] == ["c0", "c1", "c2"]
    assert rows[1]["image"] == str(tmp_path / "data" / "images" / "img1.png")
    assert load_image(rows[1]["image"], rows[1]["id"]).getpixel((0, 0)) == (10, 0, 0)
    streamed = _rows(read_image_records(jsonl, image_key="file", streaming=True))
    assert streamed == rows
    with pytest.raises(KeyError, match="image_key 'picture' not found"):
        read_image_records(jsonl, image_key="picture", cache_dir=str(tmp_path / "cache"))


def test_read_parquet_with_bytes_and_save_to_disk_with_image_feature(tmp_path):
    import datasets

    pngs = [_encoded(_image((0, 50 * i, 0)), "PNG") for i in range(3)]
    table = datasets.Dataset.from_dict({"id": ["p0", "p1", "p2"], "image": pngs, "text": ["a", "b", "c"]})
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    rows = _rows(read_image_records(tmp_path / "pairs.parquet", cache_dir=str(tmp_path / "cache")))
    assert [r["id"] for r in rows] == ["p0", "p1", "p2"]
    assert load_image(rows[2]["image"], "p2").getpixel((0, 0)) == (0, 100, 0)

    with_feature = table.cast_column("image", datasets.Image())
    with_feature.save_to_disk(str(tmp_path / "saved"))
    rows = _rows(read_image_records(tmp_path / "saved"))
    assert [r["text"] for r in rows] == ["a", "b", "c"]
    assert load_image(rows[1]["image"], "p1").getpixel((0, 0)) == (0, 50, 0)
    streamed = _rows(read_image_records(tmp_path / "saved", streaming=True))
    assert [r["id"] for r in streamed] == ["p0", "p1", "p2"]


def test_read_webdataset_tar_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"part-{shard:03d}.tar", "w") as tar:
            for i in range(2):
                key = f"s{shard}{i}"
                for name, payload in ((f"{key}.jpg", _noise_jpeg(seed=shard * 2 + i)),
                                      (f"{key}.txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    for streaming in (False, True):
        rows = _rows(read_image_records(str(shards / "*.tar"), streaming=streaming,
                                        cache_dir=str(tmp_path / "cache")))
        assert sorted(r["id"] for r in rows) == ["s00", "s01", "s10", "s11"]
        assert all(r["text"] == f"caption {r['id']}" for r in rows)
        assert all(load_image(r["image"], r["id"]).size == (64, 64) for r in rows)
    assert len(read_image_records(shards, cache_dir=str(tmp_path / "cache"))) == 4


def test_unsupported_format_is_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported image-record format"):
        read_image_records(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no files match"):
        read_image_records(str(tmp_path / "none*.jsonl"))


# ---------------------------------------------------------------------------------------- transform/collate


def test_image_transform_resize_crop_normalise_and_denormalize():
    transform = ImageTransform(16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 6, 20))  # a blue band on the left is cropped away by the centre crop
    pixel_values = transform(wide)
    assert pixel_values.shape == (3, 16, 16) and pixel_values.dtype == torch.float32
    assert torch.allclose(pixel_values[0], torch.ones(16, 16), atol=1e-6)  # (1 - 0.5) / 0.5
    assert torch.allclose(pixel_values[1], torch.full((16, 16), -1.0), atol=1e-6)  # (0 - 0.25) / 0.25
    restored = transform.denormalize(pixel_values)
    assert torch.allclose(restored[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert transform.to_pil(pixel_values).getpixel((5, 5)) == (255, 0, 0)
    with pytest.raises(ValueError, match="std"):
        ImageTransform(16, std=(0.5, 0.0, 0.5))


def test_image_dataset_skips_bad_images_and_collate_lists_them(tmp_path):
    good = _encoded(_image(), "PNG")
    records = [
        {"id": "ok-0", "image": good},
        {"id": "corrupt", "image": b"\xff\xd8\xff\xe0garbage"},
        {"id": "missing", "image": str(tmp_path / "missing.png")},
        {"id": "ok-1", "image": good},
    ]
    dataset = ImageDataset(records, ImageTransform(8))
    items = [dataset[i] for i in range(len(dataset))]
    assert items[1]["pixel_values"] is None and "sample corrupt" in items[1]["error"]
    batch = collate_images(items)
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["ids"] == ["ok-0", "ok-1"]
    assert [sid for sid, _ in batch["skipped"]] == ["corrupt", "missing"]
    assert "missing.png" in batch["skipped"][1][1]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_images)
    assert next(iter(loader))["ids"] == ["ok-0", "ok-1"]
    assert collate_images(items[1:3])["pixel_values"].shape[0] == 0


# ------------------------------------------------------------------------------------------ bad-sample tracker


def test_bad_sample_tracker_tolerates_up_to_fraction_then_raises():
    tracker = BadSampleTracker(max_bad_fraction=0.1, min_seen=10, name="captions")
    tracker.record_bad("early", "corrupt")  # 1 of 1, but fewer than min_seen: tolerated
    tracker.record_ok(9)  # 1 of 10 = 0.1, not over
    tracker.record_ok(10)
    tracker.record_bad("second", "missing file")  # 2 of 21
    assert tracker.summary()["num_bad"] == 2
    with pytest.raises(TooManyBadSamplesError) as info:
        tracker.record_bad("third", "truncated")  # 3 of 22 > 0.1
    message = str(info.value)
    assert "captions: 3 of 22 samples were bad" in message
    assert "early: corrupt" in message and "second: missing file" in message and "third: truncated" in message
    summary = tracker.summary()
    assert summary["num_seen"] == 22 and summary["num_ok"] == 19
    assert summary["bad_examples"][0] == ["early", "corrupt"]
    assert abs(summary["bad_fraction"] - 3 / 22) < 1e-9


def test_bad_sample_tracker_final_check_and_zero_tolerance():
    tracker = BadSampleTracker(max_bad_fraction=0.2, min_seen=100)
    tracker.record_bad("a", "x")
    tracker.record_ok(2)
    with pytest.raises(TooManyBadSamplesError, match="1 of 3"):
        tracker.check(final=True)  # a short pass must not hide a high fraction behind min_seen
    strict = BadSampleTracker(max_bad_fraction=0.0)
    strict.record_ok(1000)
    with pytest.raises(TooManyBadSamplesError, match="only"):
        strict.record_bad("b", "only one")
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadSampleTracker(max_bad_fraction=1.5)
