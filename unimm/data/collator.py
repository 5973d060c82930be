"""Collation of `Sample`s into the batch of docs/CONTRACTS.md, with right padding or sequence packing, and a
sampler that groups batches by task (modality) and length.

Packing puts several samples in one row of at most `max_length` tokens. Each sample's first label is ignored (it
would be predicted from the previous sample's last token), `position_ids` restart at 0 at each sample and the batch
has no `attention_mask`; transformers then derives a block-diagonal causal mask from the
position ids, so packed samples cannot attend to each other (tested with a real Qwen2). transformers only does
this when the forward pass has no KV cache: call the model with `use_cache=False` on packed batches (with the
default `use_cache=True` a cache is created and the packed rows silently attend across samples).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.sequence import Sample
from unimm.llm.layout import IGNORE_INDEX


@dataclass
class UniMMCollator:
    """`samples -> batch`. `pad_token_id` fills padding; `packing=True` needs `max_length` (the row length).

    Without packing a sample longer than `max_length` is an error (build samples with the same max_length);
    with packing, samples are placed first-fit in arrival order, so a batch of B samples may become fewer rows.
    """

    pad_token_id: int
    packing: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    tracker: BadSampleTracker | None = None

    def __post_init__(self) -> None:
        if self.packing and not self.max_length:
            raise ValueError("packing needs max_length (the length of a packed row)")

    def _rows(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        if not self.packing:
            return [[s] for s in samples]
        rows: list[list[Sample]] = []
        free: list[int] = []
        for sample in samples:
            for r, space in enumerate(free):
                if len(sample) <= space:
                    rows[r].append(sample)
                    free[r] -= len(sample)
                    break
            else:
                rows.append([sample])
                free.append(self.max_length - len(sample))
        return rows

    def __call__(self, samples: Sequence[Sample]) -> dict:
        kept = []
        for sample in samples:
            if sample is None:
                continue
            if self.max_length is not None and len(sample) > self.max_length:
                if self.tracker is None:
                    raise ValueError(f"sample {sample.sample_id} has {len(sample)} tokens > max_length "
                                     f"{self.max_length}; build samples with the same max_length")
                self.tracker.record_bad(sample.sample_id, f"{len(sample)} tokens > max_length {self.max_length}")
                continue
            kept.append(sample)
        if not kept:
            raise ValueError("no sample left to collate in this batch")
        rows = self._rows(kept)
        length = max(sum(len(s) for s in row) for row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        num_rows = len(rows)
        input_ids = torch.full((num_rows, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((num_rows, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((num_rows, length), dtype=torch.long)
        position_ids = torch.zeros((num_rows, length), dtype=torch.long)
        groups = {name: codes.shape[1] for s in kept if s.visual_codes for name, codes in s.visual_codes.items()}
        visual_codes = {name: torch.full((num_rows, length, depth), -1, dtype=torch.long)
                        for name, depth in groups.items()}
        features: list[torch.Tensor] = []
        pixels: list[torch.Tensor] = []
        sample_ids: list[str] = []
        for r, row in enumerate(rows):
            offset = 0
            for sample in row:
                end = offset + len(sample)
                input_ids[r, offset:end] = sample.input_ids
                labels[r, offset:end] = sample.labels
                # A sample's first label would be predicted from the previous sample's last token (the loss shifts
                # labels by one across the whole row): a sample starts unsupervised, as it does in its own padded
                # row. Without a BOS (Qwen) a text sample's first token is supervised and would otherwise be taught.
                labels[r, offset] = IGNORE_INDEX
                attention_mask[r, offset:end] = 1
                position_ids[r, offset:end] = torch.arange(len(sample))
                for name, codes in (sample.visual_codes or {}).items():
                    visual_codes[name][r, offset:end] = codes
                features.extend(sample.image_features)  # consumed in row-major order, like the positions
                pixels.extend(sample.pixel_values)
                sample_ids.append(sample.sample_id)
                offset = end
            if self.packing and offset < length:
                # Padding forms its own position block, so no real token attends to it (labels are ignored).
                position_ids[r, offset:] = torch.arange(length - offset)
        batch: dict = {"input_ids": input_ids, "labels": labels, "sample_ids": sample_ids}
        if self.packing:
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = attention_mask
        if visual_codes:
            batch["visual_codes"] = visual_codes
        if features:
            batch["image_features"] = torch.stack(features)  # [num_images, N, C]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)  # [num_images, 3, H, W]
        return batch


class GroupedBatchSampler(torch.utils.data.Sampler[int]):
    """Orders indices so that each run of `batch_size` consecutive indices has one task (modality) and similar
    lengths: indices are shuffled per task, cut into mega-batches of `batch_size * mega_batch_factor`, sorted by
    length inside each, split into batches (a task's last batch topped up with random indices of that task), and
    the batches shuffled. Deterministic per (seed, epoch), so every rank computes the same order. `tasks` and
    `lengths` are per index (arrays: everything runs in numpy, a few passes per task)."""

    def __init__(self, tasks: Sequence[str] | np.ndarray, lengths: Sequence[int] | np.ndarray, batch_size: int,
                 seed: int = 0, mega_batch_factor: int = 16):
        tasks = np.asarray(tasks)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if tasks.shape != self.lengths.shape or tasks.ndim != 1:
            raise ValueError(f"tasks ({len(tasks)}) and lengths ({len(self.lengths)}) must have the same size")
        if len(tasks) == 0:
            raise ValueError("GroupedBatchSampler needs at least one index")
        self.task_names, self.task_codes = _factorize(tasks)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_array(self) -> np.ndarray:
        """The epoch's batches as an int64 array [num_batches, batch_size]."""
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = []
        for code in range(len(self.task_names)):  # tasks in name order
            indices = np.flatnonzero(self.task_codes == code)
            indices = indices[rng.permutation(len(indices))]
            # Longest first inside each mega-batch; ties keep the shuffled order (lexsort is stable).
            ordered = indices[np.lexsort((-self.lengths[indices], np.arange(len(indices)) // self.mega))]
            short = -len(indices) % self.batch_size
            if short:
                ordered = np.concatenate([ordered, rng.choice(indices, size=short)])
            parts.append(ordered.reshape(-1, self.batch_size))
        batches = np.concatenate(parts)
        return batches[rng.permutation(len(batches))]

    def batches(self) -> list[list[int]]:
        return self.batch_array().tolist()

    def __iter__(self) -> Iterator[int]:
        yield from self.batch_array().reshape(-1).tolist()

    def __len__(self) -> int:
        counts = np.bincount(self.task_codes)
        return int((-(-counts // self.batch_size) * self.batch_size).sum())


def _factorize(labels: np.ndarray) -> tuple[list, np.ndarray]:
    """`(names, codes)`: the distinct labels in sorted order and each label's index among them; one vectorised
    comparison per distinct label (a mixture has a handful of tasks), no sort of the labels themselves."""
    codes = np.full(len(labels), -1, dtype=np.int64)
    found = []
    while (todo := np.flatnonzero(codes < 0)).size:
        label = labels[todo[0]]
        codes[labels == label] = len(found)
        found.append(label)
    order = sorted(range(len(found)), key=lambda i: found[i])
    rank = np.empty(len(found), dtype=np.int64)
    rank[order] = np.arange(len(found))
    return [found[i] for i in order], rank[codes]
