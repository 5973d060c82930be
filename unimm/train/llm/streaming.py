"""The Trainer side of streamed training data (`unimm.data.streaming.StreamingMixture`, `streaming: true`).

The stock `Trainer` hands an `IterableDataset` to accelerate, which either reads every batch on rank 0 and sends
it out (`dispatch_batches`) or has every rank read the whole stream and keep its share (`IterableDatasetShard`):
both read every shard somewhere else than where it is used. A stream already split by rank is therefore given
its own loader through the Trainer's public hooks:

- `get_train_dataloader`: torchdata's `StatefulDataLoader` over this rank's stream (the stream learns the device
  batch size, the grouping switch and the rank first);
- `SaveDataStateCallback`: writes the loader's `state_dict()` (every dataloader worker's stream position) to
  `checkpoint-<step>/data_state/rank<r>.pt` on every rank, before the checkpoint is marked complete;
- on resume, the loader is built with this rank's state loaded, and the stock skipping of the batches already
  trained on (which would read and build them all again) is turned off (`get_resumed_dataloader`, or
  `ignore_data_skip` on transformers releases without that hook), so the relaunch continues exactly where the
  checkpoint's step left the stream, mid-shard included. `--ignore_data_skip true` starts the stream anew.

`log_sample_ids` (any dataset) appends each optimizer step's sample ids to `output_dir/sample_ids/rank<r>.jsonl`:
what every step trained on, for audits and for checking a resumed run against an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from unimm.utils.errors import UserError

logger = logging.getLogger(__name__)

DATA_STATE_DIR = "data_state"
SAMPLE_LOG_DIR = "sample_ids"


def data_state_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / DATA_STATE_DIR / f"rank{rank}.pt"


def _is_stream(dataset: Any) -> bool:
    from unimm.data.streaming import StreamingMixture

    return isinstance(dataset, StreamingMixture)


class StreamingTrainerMixin:
    """Mixin for a `transformers.Trainer` subclass (before `Trainer` in the bases): streamed datasets get a
    `StatefulDataLoader` resumed from the checkpoint's data state; other datasets the stock loader."""

    _resume_checkpoint: str | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = resume_from_checkpoint or None
        self._sample_log_trimmed = False
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self) -> Any:
        dataset = self.train_dataset
        if not _is_stream(dataset):
            return super().get_train_dataloader()
        from torchdata.stateful_dataloader import StatefulDataLoader

        args = self.args
        if args.max_steps <= 0:
            raise UserError("streaming: true reads an endless stream (sources restart with a new shuffle when they "
                            "end): set --max_steps, the length of the run")
        dataset.configure(batch_size=self._train_batch_size, group_by_length=getattr(args, "group_by_modality_length",
                                                                                       False),
                          rank=args.process_index, world_size=args.world_size)
        workers = args.dataloader_num_workers
        loader = StatefulDataLoader(dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                                    num_workers=workers, pin_memory=args.dataloader_pin_memory,
                                    persistent_workers=args.dataloader_persistent_workers if workers else False,
                                    prefetch_factor=args.dataloader_prefetch_factor if workers else None)
        if self._resume_checkpoint is not None and not args.ignore_data_skip:
            self._load_data_state(loader)
            if not hasattr(super(), "get_resumed_dataloader"):
                # transformers < 5.25 skips the trained batches inline (accelerate's skip_first_batches, which would
                # replace this loader by a plain one reading the stream again): the state is loaded, skip nothing.
                args.ignore_data_skip = True
        return loader

    def _load_data_state(self, loader: Any) -> None:
        path = data_state_file(self._resume_checkpoint, self.args.process_index)
        if not path.is_file():
            raise UserError(f"rank {self.args.process_index}: {self._resume_checkpoint} has no data stream state "
                            f"({path}); it was not written by a streaming run: resume it with streaming off, or pass "
                            f"--ignore_data_skip true to start the stream from its beginning")
        saved = torch.load(path, weights_only=True)
        if saved["num_workers"] != self.args.dataloader_num_workers:
            raise UserError(f"{path} was written with --dataloader_num_workers {saved['num_workers']}, this launch "
                            f"has {self.args.dataloader_num_workers}: each worker reads its own shards, so a streamed "
                            f"run resumes with the workers it was saved with")
        loader.load_state_dict(saved["loader"])
        logger.info("data stream resumed from %s (no batch is read again)", path)

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """transformers >= 5.25: the trained batches are skipped here; a stream's loader was resumed from the
        checkpoint's data state when it was built."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        if isinstance(dataloader, StatefulDataLoader) and _is_stream(self.train_dataset):
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if getattr(self.args, "log_sample_ids", False) and batches:
            from unimm.train.checkpoint import trim_jsonl_log

            path = Path(self.args.output_dir) / SAMPLE_LOG_DIR / f"rank{self.args.process_index}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not getattr(self, "_sample_log_trimmed", True):  # a relaunch logs the steps after its checkpoint anew
                trim_jsonl_log(path, self.state.global_step)
                self._sample_log_trimmed = True
            line = {"step": self.state.global_step + 1,
                    "sample_ids": [list(batch.get("sample_ids", [])) for batch in batches]}
            with open(path, "a") as log:
                log.write(json.dumps(line) + "\n")
        return batches, num_items


class SaveDataStateCallback(TrainerCallback):
    """Writes what each node's copy of a checkpoint needs beyond the stock save, before the callback that marks the
    checkpoint complete: this rank's stream position (see the module doc) and, with `save_on_each_node`, DeepSpeed's
    `latest` tag file on every node (DeepSpeed writes it on global rank 0 only, so without a shared filesystem the
    other nodes' copies could not be resumed: their engines find no tag to load)."""

    def on_save(self, args, state, control, train_dataloader=None, **kwargs):
        from torchdata.stateful_dataloader import StatefulDataLoader

        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if isinstance(train_dataloader, StatefulDataLoader):
            path = data_state_file(checkpoint, args.process_index)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"num_workers": args.dataloader_num_workers, "loader": train_dataloader.state_dict()}, tmp)
            tmp.replace(path)
        tag = f"global_step{state.global_step}"
        if args.save_on_each_node and args.local_process_index == 0 and args.process_index != 0 and (
                checkpoint / tag).is_dir():
            tmp = checkpoint / f"latest.{args.process_index}.tmp"
            tmp.write_text(tag)
            tmp.replace(checkpoint / "latest")
        return control
