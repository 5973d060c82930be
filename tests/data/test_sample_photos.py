"""The scikit-image sample photos as a small set of real RGB images."""

from __future__ import annotations

import numpy as np
import pytest

import unimm.data.toy.sample_photos as sample_photos
from unimm.data.toy.sample_photos import SAMPLE_PHOTO_NAMES, center_crop_resize, load_sample_photos

pytest.importorskip("skimage")


def test_all_photos_load_as_rgb_squares_of_the_requested_size():
    photos = load_sample_photos(size=32)
    assert [name for name, _ in photos] == list(SAMPLE_PHOTO_NAMES) and len(photos) >= 10
    for name, image in photos:
        assert image.mode == "RGB" and image.size == (32, 32), name
    # Real photographs, not blank frames: every one has texture.
    assert all(np.asarray(image, dtype=np.float32).std() > 5 for _, image in photos)
    # Grey-scale originals become three equal channels.
    camera = np.asarray(dict(photos)["camera"])
    assert np.array_equal(camera[..., 0], camera[..., 2])


def test_original_resolution_and_subset_and_unknown_name():
    (name, image), = load_sample_photos(names=["astronaut"])
    assert name == "astronaut" and image.size == (512, 512)
    cropped = center_crop_resize(image.crop((0, 0, 512, 300)), 64)
    assert cropped.size == (64, 64)
    with pytest.raises(ValueError, match="unknown sample photo"):
        load_sample_photos(names=["not-a-photo"])


def test_missing_scikit_image_names_the_extra(monkeypatch):
    monkeypatch.setattr(sample_photos, "is_skimage_available", lambda: False)
    with pytest.raises(ImportError, match=r"unimm\[dev\]"):
        load_sample_photos(size=32)
