"""How many distinct patch contents the quickstart shapes data has, and how a visual tokenizer's codes cover them.

    python benchmarks/quickstart_patch_contents.py --out runs/quickstart_vqrae
    python benchmarks/quickstart_patch_contents.py --out runs/quickstart_vqrae --tokenizer_path runs/quickstart_vqrae/tokenizer/model

Reads the training images of `<out>/data/train/captions.jsonl` (with their colour, shape and position) and cuts
them into the tokenizer's patch grid. A patch's *content* is the background, or (colour, shape, offset of the patch
inside the shape's quadrant): the renderer draws every shape at the same place of its quadrant, so these keys are
the contents up to colour jitter and size. Reports the number of contents, the PSNR of replacing every patch by its
content's mean (what one code per content could reach with a context-free decoder), k-means of the raw patches at
several K (the same, with K free clusters), and, with `--tokenizer_path`, the tokenizer's codes on the same images:
codes used, perplexity, codes per content and contents per code.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimm.tokenizer.quantizers.usage import code_counts, perplexity


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Quickstart run directory (its data/train/captions.jsonl).")
    parser.add_argument("--patch_size", type=int, default=4, help="Patch side of the tokenizer (quickstart: 4).")
    parser.add_argument("--tokenizer_path", default=None, help="A saved single-group tokenizer (VQRAE) to compare.")
    parser.add_argument("--kmeans", type=int, nargs="*", default=[32, 64, 128, 256, 512], help="k-means sizes K.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the k-means initialisation.")
    return parser.parse_args(argv)


def _load(out: Path, patch: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    captions = out / "data" / "train" / "captions.jsonl"
    if not captions.is_file():
        raise FileNotFoundError(f"--out {out}: no {captions} (run scripts/quickstart_eval.py prepare first)")
    records = [json.loads(line) for line in captions.read_text().split("\n") if line]
    images = np.stack([np.asarray(Image.open(captions.parent / r["image"]).convert("RGB")) for r in records])
    count, side = images.shape[0], images.shape[1] // patch
    patches = images.reshape(count, side, patch, side, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return records, images, patches.reshape(count, side * side, patch * patch * 3).astype(np.float32) / 255


def content_keys(records: list[dict], patches: np.ndarray, tolerance: float = 0.02) -> list[tuple]:
    """One key per patch (row-major, image by image): ("background",) or (colour, shape, row, col) with the offset
    counted from the shape's quadrant corner. A patch within `tolerance` of the background colour everywhere is
    background."""
    side = int(round(patches.shape[1] ** 0.5))
    half = side // 2
    background = np.median(patches[:, 0], axis=0)  # the top-left-most patch is background in most images
    keys = []
    for record, image_patches in zip(records, patches):
        top = 0 if record["position"].startswith("top") else half
        left = 0 if record["position"].endswith("left") else half
        for index, values in enumerate(image_patches):
            row, col = divmod(index, side)
            if np.abs(values - background).max() < tolerance:
                keys.append(("background",))
            else:
                keys.append((record["colour"], record["shape"], row - top, col - left))
    return keys


def kmeans_psnr(x: torch.Tensor, k: int, seed: int, iterations: int = 30) -> float:
    """PSNR (pixels in [0, 1]) of replacing every row of `x` by its nearest of `k` Lloyd centroids."""
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations + 1):
        distances = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
        assignment = distances.argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k).float()
        refill = x[torch.randint(len(x), (k,), generator=generator)]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], refill)
    mse = float(((x - centroids[assignment]) ** 2).mean())
    return 10 * np.log10(1 / mse)


def tokenizer_codes(path: str, images: np.ndarray) -> tuple[torch.Tensor, int]:
    from unimm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path).eval()
    spec = tokenizer.codebook_spec
    if len(spec) != 1:
        raise ValueError(f"--tokenizer_path {path}: {len(spec)} codebook groups; this compares one (VQRAE)")
    (group, group_spec), = spec.items()
    codes = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            pixels = torch.cat([tokenizer.preprocess(Image.fromarray(image)) for image in images[start:start + 256]])
            codes.append(tokenizer.encode(pixels)[group][..., 0].reshape(-1))  # [B * N]
    return torch.cat(codes), group_spec.num_codes


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    records, images, patches = _load(Path(args.out), args.patch_size)
    keys = content_keys(records, patches)
    flat = patches.reshape(-1, patches.shape[-1])
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        by_key[key].append(index)
    within = sum(((flat[rows] - flat[rows].mean(0)) ** 2).sum() for rows in by_key.values()) / flat.size
    shape_contents = len(by_key) - (("background",) in by_key)
    background_share = len(by_key.get(("background",), [])) / len(keys)
    print(f"{len(records)} images, {len(keys)} patches ({background_share:.1%} background)")
    print(f"distinct patch contents: {shape_contents} (colour, shape, offset) + background; one code per content: "
          f"{10 * np.log10(1 / within):.1f} dB")
    content_counts = torch.tensor([len(rows) for rows in by_key.values()], dtype=torch.float64)
    print(f"perplexity of the content distribution: {float(perplexity(content_counts)):.1f}")
    x = torch.from_numpy(flat)
    for k in args.kmeans:
        print(f"k-means K={k}: {kmeans_psnr(x, k, args.seed):.1f} dB")
    if args.tokenizer_path:
        codes, num_codes = tokenizer_codes(args.tokenizer_path, images)
        counts = code_counts(codes, num_codes)
        codes_of: dict[tuple, set[int]] = defaultdict(set)
        contents_of: dict[int, set[tuple]] = defaultdict(set)
        for key, code in zip(keys, codes.tolist()):
            codes_of[key].add(code)
            contents_of[code].add(key)
        print(f"tokenizer: {int((counts > 0).sum())} of {num_codes} codes used "
              f"({float((counts > 0).double().mean()):.3f}), perplexity {float(perplexity(counts)):.1f}; "
              f"codes per content {np.mean([len(v) for v in codes_of.values()]):.2f}, contents per code "
              f"{np.mean([len(v) for v in contents_of.values()]):.2f} (max {max(len(v) for v in contents_of.values())}); "
              f"background codes {len(codes_of.get(('background',), ()))}")


if __name__ == "__main__":
    main()
