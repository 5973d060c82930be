"""A small set of real photographs: the sample images that ship inside scikit-image (no download).

Used where random shapes are too easy, e.g. to check that a tokenizer reconstructs natural textures, or as a
handful of real images in tests and reconstruction grids. scikit-image is an optional dependency
(`pip install 'unimm[dev]'`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from unimm.utils.imports import is_skimage_available

# Images bundled in scikit-image's wheel (loading them never touches the network). Grey-scale ones are
# converted to RGB.
SAMPLE_PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "horse",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "page",
)


def _require_skimage() -> None:
    if not is_skimage_available():
        raise ImportError(
            "the sample photos come from scikit-image, which is not installed: pip install 'unimm[dev]'"
        )


def _to_rgb_image(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        # Float images in [0, 1] (or other integer ranges) are rescaled to 8 bit.
        array = np.asarray(array, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-12) * 255.0).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"scikit-image sample {name!r} has unexpected shape {array.shape}")
    return Image.fromarray(array).convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop `image` to a square and resize it to `size` x `size` (bicubic)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.BICUBIC)


def load_sample_photos(
    size: int | None = None, names: Sequence[str] | None = None
) -> list[tuple[str, Image.Image]]:
    """The scikit-image sample photos as `(name, RGB PIL image)` pairs, in `SAMPLE_PHOTO_NAMES` order.

    size:  when given, each photo is centre-cropped to a square and resized to `size` x `size`;
           otherwise the original resolution is kept.
    names: a subset of `SAMPLE_PHOTO_NAMES` (default: all of them).
    """
    _require_skimage()
    import skimage.data

    selected = list(SAMPLE_PHOTO_NAMES if names is None else names)
    unknown = [n for n in selected if n not in SAMPLE_PHOTO_NAMES]
    if unknown:
        raise ValueError(f"unknown sample photo name(s) {unknown}; available: {list(SAMPLE_PHOTO_NAMES)}")
    photos: list[tuple[str, Image.Image]] = []
    for name in selected:
        image = _to_rgb_image(getattr(skimage.data, name)(), name)
        if size is not None:
            image = center_crop_resize(image, size)
        photos.append((name, image))
    return photos
