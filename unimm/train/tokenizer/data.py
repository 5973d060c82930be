"""Images for the tokenizer trainer and its evaluation: records from a path or a shortcut dataset, resumable
per-epoch training batches, sharded evaluation batches, and input | reconstruction grids."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from unimm.data.images import ImageDataset, collate_images, read_image_records
from unimm.train.tokenizer.args import ImageSourceArguments
from unimm.utils.distributed import get_rank, get_world_size
from unimm.utils.errors import json_source_errors, require_path

DATASET_SHORTCUTS = ("sample_photos", "shapes")


def load_records(source: str, data_args: ImageSourceArguments, seed: int) -> Any:
    """Image records (`id`, `image`) from a path or one of the shortcuts `sample_photos` / `shapes`."""
    if source == "sample_photos":
        from unimm.data.toy.sample_photos import load_sample_photos

        return [{"id": name, "image": image} for name, image in load_sample_photos(data_args.image_size)]
    if source == "shapes":
        from unimm.data.toy.shapes import ShapesConfig, ShapesDataset

        config = ShapesConfig(image_size=data_args.image_size) if data_args.image_size else None
        shapes = ShapesDataset(data_args.num_samples, seed=seed, config=config)
        return [{"id": sample.id, "image": sample.image} for sample in shapes]
    require_path("dataset", source)
    with json_source_errors(source):
        return read_image_records(source, image_key=data_args.image_key, split=data_args.split,
                                  allow_outside_folder=data_args.allow_outside_image_folder)


class EpochBatches:
    """Per-rank batches of dataset indices: epoch `e` is a permutation seeded by `(seed, e)`, cut into global
    batches of `batch_size * world_size` (remainder dropped), each rank taking its slice.

    Batch `i` overall is `batches(i // per_epoch)[i % per_epoch]`, so a data position is one integer.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_items // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_items} images, fewer than one global batch "
                f"({batch_size} per device x {world_size} devices); lower per_device_train_batch_size"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        batches = []
        for b in range(self.per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            batches.append(order[start : start + self.batch_size])
        return batches

    def iterate(self, dataset: ImageDataset, start: int, num_workers: int) -> Iterator[dict]:
        """Collated batches from overall batch index `start` onwards (forever)."""
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            loader = DataLoader(
                dataset,
                batch_sampler=self.epoch(epoch)[offset:],
                collate_fn=collate_images,
                num_workers=num_workers,
                generator=torch.Generator(),  # keep the global RNG untouched (exact resume)
            )
            yield from loader
            epoch, offset = epoch + 1, 0


def eval_batches(dataset: ImageDataset, batch_size: int, max_images: int | None, num_workers: int = 0) -> DataLoader:
    """Sequential evaluation batches over (the first `max_images` of) `dataset`, sharded across ranks."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(count))[get_rank() :: get_world_size()]
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_images, num_workers=num_workers, generator=torch.Generator()
    )


def image_from_tensor(image01: torch.Tensor) -> Image.Image:
    """One `[3, H, W]` image in [0, 1] -> PIL RGB."""
    return Image.fromarray((image01.float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


def comparison_grid(inputs01: torch.Tensor, reconstructions01: torch.Tensor, columns: int = 4) -> Image.Image:
    """A PNG-ready grid of (input | reconstruction) pairs from images in [0, 1] (`[B, 3, H, W]`)."""
    pairs = torch.cat([inputs01, reconstructions01], dim=-1)  # [B, 3, H, 2W]
    batch, _, height, width = pairs.shape
    columns = max(1, min(columns, batch))
    rows = math.ceil(batch / columns)
    pad = 2
    canvas = torch.ones(3, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for i in range(batch):
        r, c = divmod(i, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[:, top : top + height, left : left + width] = pairs[i].float().clamp(0, 1)
    return image_from_tensor(canvas)
