"""The one transform that turns a PIL image into visual-tokenizer input (and back for display).

It lives on the tokenizer floor because the tokenizer defines what its input is (`VisualTokenizer.preprocess`);
every path that feeds images to a tokenizer or a vision tower (training, code caches, chat, evaluation) builds it
with `ImageTransform.for_tokenizer`, so a photo is encoded the same everywhere. `unimm.data.images` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGE_ASPECTS", "ImageTransform"]

IMAGE_ASPECTS = ("crop", "pad", "squash")


class ImageTransform:
    """PIL image -> normalised FloatTensor [3, H, W]; the one transform of every path that turns images into
    tokenizer input (training, code caches, chat, evaluation, `VisualTokenizer.preprocess`), so a photo is encoded
    the same everywhere. Build it from a tokenizer with `ImageTransform.for_tokenizer`.

    `aspect="crop"`: resize the short side to `image_size` (bicubic) and centre-crop a square.
    `aspect="pad"`: pad the long side to a square filled with `mean` (LLaVA's `image_aspect_ratio: pad`, which fills
    with the image processor's mean, so the padding normalises to 0), then resize to `image_size` (bicubic); the
    whole image is kept. `pad_fill` overrides the padding colour (8-bit RGB; LLaVA truncates `mean * 255`, which
    `unimm.llm.vision_tower` uses so that pixels match LLaVA's exactly).
    `aspect="squash"`: resize to a square ignoring the aspect ratio, as SigLIP's image processor does (vision towers
    only; visual tokenizers crop or pad).
    Then scale to [0, 1], subtract `mean` and divide by `std` (per channel)."""

    def __init__(self, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), aspect: str = "crop",
                 pad_fill: Sequence[int] | None = None):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)}, std={list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {list(std)}")
        if aspect not in IMAGE_ASPECTS:
            raise ValueError(f"aspect must be one of {IMAGE_ASPECTS}, got {aspect!r}")
        if pad_fill is not None and (len(pad_fill) != 3 or any(not 0 <= int(v) <= 255 for v in pad_fill)):
            raise ValueError(f"pad_fill needs 3 values in [0, 255] (RGB), got {list(pad_fill)}")
        self.pad_fill = None if pad_fill is None else tuple(int(v) for v in pad_fill)
        self.image_size = int(image_size)
        self.aspect = aspect
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def for_tokenizer(cls, visual_tokenizer: Any) -> ImageTransform:
        """The transform of a visual tokenizer (or `VisionTower`): its input size, its encoder's normalisation, its
        `image_aspect` and, where it has one, its `image_pad_fill`."""
        return cls(int(visual_tokenizer.image_size), tuple(visual_tokenizer.image_mean),
                   tuple(visual_tokenizer.image_std), aspect=getattr(visual_tokenizer, "image_aspect", "crop"),
                   pad_fill=getattr(visual_tokenizer, "image_pad_fill", None))

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def pad_and_resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        side = max(width, height)
        if width != height:
            fill = self.pad_fill or tuple(int(round(float(m) * 255)) for m in self.mean.flatten())
            square = Image.new("RGB", (side, side), fill)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            image = square
        if side != self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect == "crop":
            image = self.resize_and_crop(image)
        elif self.aspect == "pad":
            image = self.pad_and_resize(image)
        elif image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]
        return (tensor - self.mean) / self.std

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Several images -> [B, 3, H, W]."""
        return torch.stack([self(image) for image in images])

    def denormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Invert the normalisation ([..., 3, H, W] -> values in [0, 1], clamped)."""
        mean = self.mean.to(pixel_values.device, pixel_values.dtype)
        std = self.std.to(pixel_values.device, pixel_values.dtype)
        return (pixel_values * std + mean).clamp(0.0, 1.0)

    def to_pil(self, pixel_values: torch.Tensor) -> Image.Image:
        """One normalised [3, H, W] tensor -> PIL image."""
        array = (self.denormalize(pixel_values.detach().float().cpu()) * 255.0).round().byte()
        return Image.fromarray(array.permute(1, 2, 0).numpy())
