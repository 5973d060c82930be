"""One image transform: a non-square real photo gives the same pixel_values through training, code caches, chat,
evaluation and `VisualTokenizer.preprocess`, in both aspect modes (centre crop, LLaVA-style pad to square)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unimm.data.images import ImageDataset, ImageTransform, load_image
from unimm.tokenizer import build_tokenizer

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("coffee", "rocket")  # 600x400 and 640x427: landscape, not square


@pytest.fixture(scope="module", params=PHOTOS)
def photo(request, tmp_path_factory):
    image = Image.fromarray(getattr(skimage_data, request.param)()).convert("RGB")
    assert image.width != image.height
    path = tmp_path_factory.mktemp("photos") / f"{request.param}.png"
    image.save(path)
    return path


def _paths(tokenizer, path) -> dict[str, torch.Tensor]:
    """pixel_values of the photo at `path` through every path that feeds the tokenizer."""
    from unimm.data.tasks import PixelImages

    image = load_image(str(path), "photo")
    return {
        "preprocess (chat, shapes eval)": tokenizer.preprocess(image)[0],
        "training / eval_tokenizer dataset": ImageDataset([{"id": "p", "image": str(path)}],
                                                          ImageTransform.for_tokenizer(tokenizer))[0]["pixel_values"],
        "LLM pixel inputs": PixelImages(path.parent, tokenizer.image_transform, tokenizer.num_positions)(
            path.name, "p").pixel_values,
    }


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_non_square_photo_gives_identical_pixels_on_every_path(photo, aspect):
    tokenizer = build_tokenizer("vqrae-tiny", image_aspect=aspect)
    paths = _paths(tokenizer, photo)
    reference = paths["preprocess (chat, shapes eval)"]
    size = tokenizer.image_size
    assert reference.shape == (3, size, size)
    for name, pixels in paths.items():
        assert torch.equal(pixels, reference), name
    squashed = tokenizer.image_transform(load_image(str(photo), "p").resize((size, size), Image.Resampling.BICUBIC))
    assert not torch.allclose(reference, squashed, atol=0.05)  # the old preprocess squashed; no path does now


def test_pad_to_square_keeps_the_whole_image_and_fills_with_the_mean(photo):
    image = load_image(str(photo), "p")
    size = 64
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP/SigLIP-style
    padded = ImageTransform(size, mean, std, aspect="pad")(image)  # [3, 64, 64]
    band = round(size * image.height / image.width)  # rows holding the (landscape) photo
    top = (size - band) // 2
    # the padding normalises to ~0 (the fill is the normalisation mean, rounded to 8 bits)
    assert padded[:, : top - 2].abs().max() < 0.02 and padded[:, top + band + 2:].abs().max() < 0.02
    # the band is the whole photo, resized: compare with the photo resized to the band directly
    content = ImageTransform(size, mean, std).denormalize(padded)[:, top + 1: top + band - 1]
    expected = np.asarray(image.resize((size, band), Image.Resampling.BICUBIC), dtype=np.float32)[1:-1] / 255.0
    error = (content.permute(1, 2, 0).numpy() - expected) ** 2
    assert 10 * np.log10(1.0 / error.mean()) > 20.0  # PSNR: the same picture (resampled twice), not a crop of it
    cropped = ImageTransform(size, mean, std, aspect="crop")(image)
    assert cropped[:, 0].abs().mean() > 0.1  # the crop has photo content in its first row; the pad does not


def test_pad_fill_and_squash(photo):
    """Vision towers: `pad_fill` sets the padding colour exactly (LLaVA truncates mean * 255, the default rounds);
    `squash` resizes the whole photo to the square (SigLIP's processor)."""
    image = load_image(str(photo), "p")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    fill = (122, 116, 104)  # int(mean * 255); the default fill is (123, 117, 104)
    padded = ImageTransform(64, mean, std, aspect="pad", pad_fill=fill)(image)
    corner = ImageTransform(64, mean, std).denormalize(padded)[:, 0, 0] * 255
    assert torch.allclose(corner, torch.tensor(fill, dtype=torch.float32), atol=1e-3)
    assert not torch.equal(padded, ImageTransform(64, mean, std, aspect="pad")(image))
    squashed = ImageTransform(64, mean, std, aspect="squash")(image)
    expected = ImageTransform(64, mean, std)(image.resize((64, 64), Image.Resampling.BICUBIC))
    assert torch.equal(squashed, expected)
    with pytest.raises(ValueError, match="pad_fill needs 3 values in"):
        ImageTransform(64, pad_fill=(300, 0, 0))


def test_transform_rejects_unknown_aspect():
    with pytest.raises(ValueError, match="aspect must be one of"):
        ImageTransform(32, aspect="stretch")
    with pytest.raises(ValueError, match="image_aspect must be 'crop' or 'pad'"):
        build_tokenizer("vqrae-tiny", image_aspect="squash")


def test_default_aspect_leaves_config_hash_unchanged():
    """Code caches written before `image_aspect` existed stay valid: the default is not part of the hash."""
    base = build_tokenizer("vqrae-tiny")
    assert "image_aspect" not in base.config.hash_dict()
    assert build_tokenizer("vqrae-tiny", image_aspect="pad").config_hash() != base.config_hash()


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_code_cache_codes_are_those_of_the_chat_path(photo, aspect, tmp_path):
    """Pretokenize (the real program path) stores exactly the codes the tokenizer gives `preprocess`'s pixels."""
    from unimm.data.code_cache import finalize_code_cache, load_code_cache, pretokenize
    from unimm.data.images import read_image_records

    tokenizer = build_tokenizer("vqrae-tiny", image_aspect=aspect).eval()
    pretokenize(read_image_records(photo.parent), tokenizer, tmp_path / "cache", batch_size=1, show_progress=False)
    finalize_code_cache(tmp_path / "cache", tokenizer)
    (row,) = list(load_code_cache(tmp_path / "cache", tokenizer.config_hash()))
    with torch.no_grad():
        expected = tokenizer.encode(tokenizer.preprocess(load_image(str(photo), "p")))
    for group, codes in expected.items():
        assert torch.equal(row["codes"][group], codes[0]), group
