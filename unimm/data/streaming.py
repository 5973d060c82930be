"""The streaming task mixture: tasks mixed over sharded sources, read as a stream, with exact resume.

`StreamingMixture` is an `IterableDataset` for data too large for the map-style `MixtureDataset` (whose schedule
and length hints are arrays over every item). Nothing is listed or built before the first batch: each task reads
its source's shards (`ShardSource`: an ordered list of shard files plus `read(shard, start)`) as a stream.

- **Readers.** Rank r of R with dataloader worker w of W is reader g = r * W + w of G = R * W; it reads shards
  g, g + G, g + 2G ... of every source and no other file, so nodes need only their own shards on local disk (the
  shard list itself, a code cache's `cache_info.json`, must be on every node). A source needs at least G shards.
- **Shuffling.** Each pass (epoch) over a reader's shards visits them in a seeded permutation; records are read in
  windows of `shuffle_window` consecutive records (crossing shard ends) and each window is permuted. A source that
  reaches its end starts the next epoch with a new shard permutation, so the stream never ends: train with
  `max_steps`.
- **Mixture.** The task of each sample (each device batch with grouping) is chosen by smooth weighted round-robin:
  every choice adds each task's weight to its credit and takes the task with the largest credit, which then pays the
  total weight. After n choices every task has been chosen n * weight / total times, rounded up or down: the weights
  hold per step, not only on average. Reader g starts g choices into the cycle, so the batches that the readers
  (ranks, workers) contribute to one optimizer step are not all of one task.
- **Grouping** (`group_by_length`, the Trainer's `group_by_modality_length`): a task's samples are built `look_ahead`
  device batches at a time, sorted by length and cut into batches, which leave in a seeded order: every run of
  `batch_size` samples holds one task and similar lengths, with a buffer of `look_ahead * batch_size` samples per
  task instead of a pass over the data. Packing (`UniMMCollator(packing=True)`) then packs each such batch.
- **Exact resume.** Everything random is a function of (seed, task, reader, position), so the state is a handful of
  integers: per task, the epoch, the shard and record offset where the current window starts and how many of its
  records were taken (grouping: where the current look-ahead buffer was filled from and how many of its samples
  left), plus the round-robin credits. `state_dict()` / `load_state_dict()` save and restore them; on restore the
  current window (and buffer) is read again from its start and the samples already taken are skipped, so a run
  resumed mid-shard sees exactly the samples an uninterrupted run sees. `torchdata`'s `StatefulDataLoader` calls
  them in each dataloader worker and keeps the workers' states in its own `state_dict()`, which the trainer writes
  into every checkpoint (`unimm.train.llm.streaming`).

The shard readers live in `unimm.data.shards`: `CodeCacheShards` (a finished cache's manifest plus whichever of
its shard files this node holds, each checked against its recorded checksum when first read) and `JsonShards`
(conversation or text records in JSON Lines / JSON / text files, a folder of them: one shard per file). A record's
`shard_position` (bad records counted) is where the stream resumes after it, so readers that skip bad records
stay exact.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.sequence import Sample, SampleError
from unimm.data.shards import POSITION, CodeCacheShards, JsonShards, ShardSource  # noqa: F401 - readers re-exported
from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

STATE_VERSION = 1
READ_CHUNK = 64  # code-cache records converted to numpy at once
MAX_BAD_IN_A_ROW = 10_000


class StreamStateError(UserError, ValueError):
    """A saved stream state that does not fit this stream (other sources, readers or batch size)."""


# ------------------------------------------------------------------------------------------------ shard readers


# ------------------------------------------------------------------------------------------------ streams


@dataclass
class StreamTask:
    """One task of the mixture: its sharded records, how a record becomes a sample, and its weight."""

    task: str
    source: ShardSource
    build: Callable[[dict, int], Sample]
    weight: float
    tracker: BadSampleTracker | None = None


def _key(*parts: Any) -> list[int]:
    """A numpy seed from strings and integers (crc32 of strings: stable across processes and runs)."""
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]


class _RecordStream:
    """One reader's records of one task: shards in a seeded order per epoch, windows of records permuted. The state
    (`epoch`, `shard`, `offset`: where the current window starts; `taken`: records of it handed out) fixes what
    comes next."""

    def __init__(self, task: StreamTask, seed: int, reader: int, readers: int, window: int):
        self.task, self.seed, self.reader, self.window_size = task, seed, reader, window
        all_shards = task.source.shards()
        self.shards = all_shards[reader::readers]
        if not self.shards:
            raise UserError(f"{task.source.name} has {len(all_shards)} shard(s), fewer than the {readers} readers "
                            f"(ranks x dataloader workers) of the {task.task} stream: each reader needs its own "
                            f"shards (write smaller shards, or use fewer dataloader workers)")
        self.state = {"epoch": 0, "shard": 0, "offset": 0, "taken": 0}
        self._window: list[dict] | None = None
        self._end: tuple[int, int, int] | None = None

    def _order(self, epoch: int) -> list[str]:
        rng = np.random.default_rng(_key(self.seed, self.task.task, self.reader, epoch, 1))
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def _fill(self) -> None:
        """Read the window starting at the state's position (the next epoch's start if this epoch is done)."""
        for _attempt in range(2):
            epoch, shard, offset = self.state["epoch"], self.state["shard"], self.state["offset"]
            order = self._order(epoch)
            records: list[dict] = []
            while shard < len(order) and len(records) < self.window_size:
                reading = self.task.source.read(order[shard], offset)
                try:
                    for record in reading:
                        records.append(record)
                        offset = record[POSITION] + 1 if POSITION in record else offset + 1  # readers that skip
                        if len(records) == self.window_size:
                            break
                    else:  # the shard ended
                        shard, offset = shard + 1, 0
                finally:
                    reading.close()
            if records:
                rng = np.random.default_rng(_key(self.seed, self.task.task, self.reader, epoch, self.state["shard"],
                                                 self.state["offset"], 2))
                self._window = [records[i] for i in rng.permutation(len(records))]
                self._end = (epoch, shard, offset)
                return
            self.state.update(epoch=epoch + 1, shard=0, offset=0, taken=0)
        raise UserError(f"{self.task.source.name}: the shards of reader {self.reader} ({', '.join(self.shards)}) "
                        f"hold no records")

    def next(self) -> tuple[dict, int]:
        """The next record and the epoch it belongs to."""
        if self._window is None:
            self._fill()
        record = self._window[self.state["taken"]]
        epoch = self.state["epoch"]
        self.state["taken"] += 1
        if self.state["taken"] == len(self._window):
            epoch_end, shard, offset = self._end
            self.state.update(epoch=epoch_end, shard=shard, offset=offset, taken=0)
            self._window = None
        return record, epoch

    def load(self, state: dict) -> None:
        self.state = dict(state)
        self._window = None
        if self.state["taken"]:  # mid-window: read it again, the records already taken are skipped by `taken`
            taken = self.state["taken"]
            self.state["taken"] = 0
            self._fill()
            self.state["taken"] = taken


class _SampleStream:
    """One reader's built samples of one task (bad records skipped and counted), with an optional look-ahead
    buffer that sorts `look_ahead` batches by length."""

    def __init__(self, task: StreamTask, records: _RecordStream, batch_size: int, look_ahead: int, seed: int):
        self.task, self.records = task, records
        self.tracker = task.tracker or BadSampleTracker(name=f"{task.task} data")
        self.batch_size, self.look_ahead, self.seed = batch_size, look_ahead, seed
        self.buffer: list[Sample] = []
        self.buffer_start: dict | None = None  # the record stream's state the buffer was filled from
        self.emitted = 0
        self.fills = 0

    def _build_next(self) -> Sample:
        """The next record that builds (bad ones are counted by the tracker, which stops the run past
        `max_bad_fraction`; a stream of nothing but bad records stops after `MAX_BAD_IN_A_ROW`)."""
        for _attempt in range(MAX_BAD_IN_A_ROW):
            record, epoch = self.records.next()
            try:
                sample = self.task.build(record, epoch)
            except SampleError as err:
                self.tracker.record_bad(err.sample_id, err.reason)
                self.tracker.check()
                continue
            self.tracker.record_ok()
            return sample
        raise UserError(f"{self.task.source.name}: {MAX_BAD_IN_A_ROW} {self.task.task} records in a row could not be "
                        f"built (e.g. {self.tracker.bad_examples[:3]})")

    def _fill(self) -> None:
        self.buffer_start = dict(self.records.state)
        samples = [self._build_next() for _ in range(self.batch_size * self.look_ahead)]
        # Longest first (ties keep the stream order), cut into batches that leave in a seeded order.
        order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng(_key(self.seed, self.task.task, self.records.reader, self.fills, 3))
        self.buffer = [samples[i] for b in rng.permutation(len(batches)) for i in batches[b]]
        self.emitted = 0

    def next(self) -> Sample:
        if self.look_ahead == 0:
            return self._build_next()
        if self.emitted == len(self.buffer):
            self._fill()
            self.fills += 1
        sample = self.buffer[self.emitted]
        self.emitted += 1
        return sample

    def state_dict(self) -> dict:
        if self.look_ahead and self.buffer_start is not None and self.emitted < len(self.buffer):
            return {"records": dict(self.buffer_start), "emitted": self.emitted, "fills": self.fills - 1}
        return {"records": dict(self.records.state), "emitted": 0, "fills": self.fills}

    def load(self, state: dict) -> None:
        self.records.load(state["records"])
        self.buffer, self.buffer_start, self.fills, self.emitted = [], None, state["fills"], 0
        if state["emitted"]:
            self._fill()
            self.fills += 1
            self.emitted = state["emitted"]


class StreamingMixture(torch.utils.data.IterableDataset):
    """Samples of several tasks over sharded sources (see the module doc): an endless stream, the same for every
    rerun with the same seed, readers, batch size and grouping, resumable exactly from `state_dict()`.

    `configure(batch_size, group_by_length, rank, world_size)` is called by whoever builds the dataloader (the
    trainer) before iterating: the batch size matters for grouping, rank and world size for the shard split."""

    def __init__(self, tasks: list[StreamTask], seed: int = 0, shuffle_window: int = 1024, look_ahead: int = 16):
        tasks = [t for t in tasks if t.weight > 0]
        if not tasks:
            raise ValueError("the mixture has no source with a positive weight")
        if shuffle_window <= 0 or look_ahead <= 0:
            raise ValueError(f"shuffle_window and look_ahead must be positive, got {shuffle_window}, {look_ahead}")
        self.tasks = tasks
        self.names = [t.task for t in tasks]
        self.weights = np.array([t.weight for t in tasks], dtype=np.float64)
        self.seed, self.shuffle_window, self.look_ahead = seed, shuffle_window, look_ahead
        self.batch_size, self.group_by_length, self.rank, self.world_size = 1, False, 0, 1
        self._streams: list[_SampleStream] | None = None
        self._mix: dict | None = None
        self._pending: dict | None = None

    def configure(self, batch_size: int = 1, group_by_length: bool = False, rank: int = 0,
                  world_size: int = 1) -> StreamingMixture:
        if not 0 <= rank < world_size or batch_size <= 0:
            raise ValueError(f"invalid stream split: rank {rank} of {world_size}, batch size {batch_size}")
        self.batch_size, self.group_by_length, self.rank, self.world_size = batch_size, group_by_length, rank, \
            world_size
        self._streams = None
        return self

    def _reader(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def _start(self) -> None:
        reader, readers = self._reader()
        look_ahead = self.look_ahead if self.group_by_length else 0
        self._streams = [_SampleStream(t, _RecordStream(t, self.seed, reader, readers, self.shuffle_window),
                                       self.batch_size, look_ahead, self.seed) for t in self.tasks]
        self._mix = {"reader": reader, "readers": readers, "credits": [0.0] * len(self.tasks), "task": -1,
                     "left": 0}
        for _ in range(reader):  # each reader starts at another phase of the cycle: a step's batches mix tasks
            self._choose()
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def _choose(self) -> int:
        credits = self._mix["credits"]
        for i, weight in enumerate(self.weights):
            credits[i] += float(weight)
        choice = int(np.argmax(credits))
        credits[choice] -= float(self.weights.sum())
        return choice

    def __iter__(self) -> Iterator[Sample]:
        if self._streams is None or self._pending is not None:
            self._start()
        mix = self._mix
        per_choice = self.batch_size if self.group_by_length else 1
        while True:
            if mix["left"] == 0:
                mix["task"], mix["left"] = self._choose(), per_choice
            mix["left"] -= 1
            yield self._streams[mix["task"]].next()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where this reader is (see the module doc); before the first iteration, the state to be restored."""
        if self._streams is None:
            return dict(self._pending) if self._pending is not None else {}
        return {"version": STATE_VERSION, "tasks": list(self.names), "batch_size": self.batch_size,
                "group_by_length": self.group_by_length, **{k: v for k, v in self._mix.items()},
                "credits": list(self._mix["credits"]),
                "streams": {name: stream.state_dict() for name, stream in zip(self.names, self._streams)}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state` at the next iteration (an empty state: from the start)."""
        self._pending = dict(state) if state else None
        self._streams = None

    def _restore(self, state: dict) -> None:
        mine = {"tasks": list(self.names), "batch_size": self.batch_size, "group_by_length": self.group_by_length,
                "reader": self._mix["reader"], "readers": self._mix["readers"]}
        saved = {key: state.get(key) for key in mine}
        if state.get("version") != STATE_VERSION or saved != mine:
            differ = ", ".join(f"{k}: saved {saved[k]!r}, now {mine[k]!r}" for k in mine if saved[k] != mine[k])
            raise StreamStateError(f"the saved data stream state does not fit this stream ({differ or 'version'}); "
                                   f"resume with the same data, tasks, world size, dataloader workers, batch size "
                                   f"and grouping")
        self._mix.update(credits=list(state["credits"]), task=state["task"], left=state["left"])
        for name, stream in zip(self.names, self._streams):
            stream.load(state["streams"][name])
