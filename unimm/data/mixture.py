"""The task mixture: which tasks are mixed, from which data, with which weights (`MixtureConfig`), and the
training dataset built from it: the map-style `MixtureDataset` (small data, a fixed per-epoch schedule) or, with
`streaming`, the iterable `unimm.data.streaming.StreamingMixture` (sharded sources, exact resume).

Tasks, samples and the per-task datasets live in `unimm.data.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.sequence import Sample
from unimm.data.shards import CodeCacheShards, JsonShards
from unimm.data.streaming import StreamingMixture, StreamTask
from unimm.data.tasks import (
    UNDERSTANDING_INPUTS,
    CodeCacheImages,
    ImageProvider,
    PixelImages,
    SampleFactory,
    TaskDataset,
    caption_builder,
    caption_dataset,
    conversation_builder,
    conversation_dataset,
    t2i_builder,
    t2i_dataset,
    text_builder,
    text_dataset,
)
from unimm.utils.config import config_field
from unimm.utils.errors import OptionError


@dataclass
class MixtureConfig:
    """Which tasks are mixed, from which data, with which weights (the LLM programs parse it as part of
    `unimm.train.args.DataArguments`)."""

    code_cache: str | None = config_field(None, "Code cache directory (scripts/pretokenize.py).")
    conversation_json: str | None = config_field(None, "LLaVA-format conversation JSON/jsonl file.")
    image_folder: str | None = config_field(None, (
        "Folder that image paths in conversation_json are relative to (default: the JSON file's folder)."))
    conversation_code_cache: str | None = config_field(None, (
        "Code cache of the conversation images (keyed by image path); default: code_cache, or pixels if unset."))
    understanding_input: str = config_field("auto", (
        "How conversation images reach the LLM: codes (conversation_code_cache, else code_cache), features (pixels "
        "from image_folder -> the visual tokenizer's encode_features -> the feature projector, VQRAE's understanding "
        "path, while text-to-image still reads codes from code_cache; a new model gets a projector), or auto "
        "(conversation_code_cache, else pixels when the model has a projector, else code_cache; a new model gets "
        "a projector only when neither cache is set)."))
    text_data: str | None = config_field(None, "Text-only data: .txt (one per line) or jsonl with 'text'.")
    caption_weight: float = config_field(1.0, "Mixture weight of caption samples.")
    t2i_weight: float = config_field(1.0, "Mixture weight of text-to-image samples.")
    conversation_weight: float = config_field(0.0, "Mixture weight of conversation samples.")
    text_weight: float = config_field(0.0, "Mixture weight of text-only samples.")
    num_samples: int | None = config_field(None, (
        "Samples per epoch drawn from the mixture; default: the size of the largest source."))
    max_bad_fraction: float = config_field(0.01, "Fraction of bad records tolerated before stopping.")
    seed: int = config_field(0, "Seed of the mixture's source order.")
    allow_outside_image_folder: bool = config_field(False, (
        "Let conversation image paths leave image_folder (absolute paths, `..`, symlinks); off: such records are "
        "skipped and counted."))
    allow_tokenizer_weights_mismatch: bool = config_field(False, (
        "Use code caches whose tokenizer has the same config but other weights (a warning instead of an error)."))
    streaming: bool = config_field(False, (
        "Read the data as a stream of shards (unimm.data.streaming): code_cache's shards, and conversation_json / "
        "text_data as a file or a folder of .jsonl/.json files (one shard each); each rank and dataloader worker "
        "reads only its own shards, nothing is listed at start-up, checkpoints resume the stream exactly. Needs "
        "max_steps; num_samples does not apply."))
    image_shards: str | None = config_field(None, (
        "Streaming without a code cache: webdataset .tar or Parquet files of image-text pairs (a file, folder, glob "
        "or brace range such as shard-{00000..00099}.tar), read as shards and encoded on the fly by the visual "
        "tokenizer (a CPU copy, in the dataloader workers) for caption and text-to-image samples. Pretokenizing "
        "(scripts/pretokenize.py --input_shards true) encodes once instead of every epoch."))
    encode_batch_size: int = config_field(32, "image_shards: images encoded together by the visual tokenizer.")
    shuffle_window: int = config_field(1024, (
        "Streaming: records read and shuffled together (besides the per-epoch shuffle of each reader's shards)."))
    look_ahead_batches: int = config_field(16, (
        "Streaming with group_by_modality_length: device batches of one task built ahead and sorted by length."))

    def __post_init__(self) -> None:
        for name in ("caption_weight", "t2i_weight", "conversation_weight", "text_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shuffle_window <= 0 or self.look_ahead_batches <= 0:
            raise ValueError(f"shuffle_window and look_ahead_batches must be positive, got {self.shuffle_window}, "
                             f"{self.look_ahead_batches}")
        if self.image_shards is not None and not self.streaming:
            raise ValueError(f"image_shards={self.image_shards} is read as a stream: set streaming true (or "
                             f"pretokenize the shards and give code_cache)")
        if self.image_shards is not None and self.code_cache is not None:
            raise ValueError(f"both image_shards={self.image_shards} and code_cache={self.code_cache} would give the "
                             f"caption and text-to-image samples: drop one of them")
        if self.encode_batch_size <= 0:
            raise ValueError(f"encode_batch_size must be positive, got {self.encode_batch_size}")
        if self.understanding_input not in UNDERSTANDING_INPUTS:
            raise ValueError(f"understanding_input must be one of {UNDERSTANDING_INPUTS}, got "
                             f"{self.understanding_input!r}")
        if self.understanding_input == "features":
            if self.conversation_code_cache is not None:
                raise ValueError(f"understanding_input=features reads conversation images as pixels, but "
                                 f"conversation_code_cache={self.conversation_code_cache} is set: drop one of them")
            if self.caption_weight > 0:
                raise ValueError(f"understanding_input=features: caption samples would still read codes from "
                                 f"code_cache (caption_weight={self.caption_weight}); set caption_weight 0 and give "
                                 f"the captions as conversations (conversation_json) to read them from pixels")

    @property
    def new_model_needs_projector(self) -> bool:
        """Whether a new model must get a feature projector: some conversation images are read as pixels."""
        if self.conversation_weight <= 0 or self.understanding_input == "codes":
            return False
        if self.understanding_input == "features":
            return True
        return not (self.conversation_code_cache or self.code_cache)


class MixtureDataset(torch.utils.data.Dataset):
    """Draws `num_samples` items from several task datasets with probabilities proportional to their weights.

    The schedule is fixed by `seed`: item i -> (source, position); each source is walked through a seeded
    permutation, restarting (with a new permutation and epoch) when exhausted. `tasks` holds each item's task and
    `length_hints()` its estimated length (from the sources' metadata), both as arrays built without a per-item
    Python loop, so a sampler over millions of items starts in seconds and builds no sample.
    """

    def __init__(self, sources: dict[str, tuple[TaskDataset, float]], num_samples: int | None = None,
                 seed: int = 0):
        active = {name: (ds, w) for name, (ds, w) in sources.items() if w > 0}
        empty = [name for name, (ds, _) in active.items() if len(ds) == 0]
        if empty:
            raise ValueError(f"mixture source(s) {empty} have weight > 0 but no records")
        if not active:
            raise ValueError("the mixture has no source with a positive weight")
        self.names = list(active)
        self.datasets = [active[name][0] for name in self.names]
        weights = np.array([active[name][1] for name in self.names], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.num_samples = num_samples or max(len(ds) for ds in self.datasets)
        rng = np.random.default_rng(seed)
        self.source_of = rng.choice(len(self.names), size=self.num_samples, p=self.probabilities)
        self.position = np.zeros(self.num_samples, dtype=np.int64)
        self.epoch = np.zeros(self.num_samples, dtype=np.int64)
        for source, dataset in enumerate(self.datasets):
            # The k-th item drawn from `source` takes entry k % size of permutation (seed, source, k // size).
            items = np.flatnonzero(self.source_of == source)
            size = len(dataset)
            self.epoch[items] = np.arange(len(items)) // size
            for epoch, start in enumerate(range(0, len(items), size)):
                chunk = items[start:start + size]
                self.position[chunk] = np.random.default_rng([seed, source, epoch]).permutation(size)[:len(chunk)]
        self.tasks = np.array([dataset.task for dataset in self.datasets])[self.source_of]

    def __len__(self) -> int:
        return self.num_samples

    def task_of(self, index: int) -> str:
        return str(self.tasks[index])

    def length_hints(self) -> np.ndarray:
        """Estimated token length of each item (int64 [num_samples]): its record's `TaskDataset.length_hints`."""
        hints = np.zeros(self.num_samples, dtype=np.int64)
        for source, dataset in enumerate(self.datasets):
            items = self.source_of == source
            hints[items] = dataset.length_hints()[self.position[items]]
        return hints

    def __getitem__(self, index: int) -> Sample:
        source = self.source_of[index]
        return self.datasets[source].get(int(self.position[index]), int(self.epoch[index]))


def build_mixture(config: MixtureConfig, factory: SampleFactory, tokenizer_hash: Any | None = None,
                  pixel_images: PixelImages | None = None,
                  visual_tokenizer: Any | None = None) -> MixtureDataset | StreamingMixture:
    """The training dataset described by `config`. `tokenizer_hash` (the visual tokenizer's `TokenizerIdentity`:
    config and weights hashes; a bare `config_hash()` string checks the architecture only) is checked against
    every code cache; `pixel_images` serves conversation images when no code cache covers them. With `streaming`
    the sources are read as shards (`build_streaming_mixture`; `visual_tokenizer` encodes `image_shards`)."""
    from functools import partial

    from unimm.data.code_cache import load_code_cache as _load_code_cache
    from unimm.data.sources import read_llava_json, read_text_records

    load_code_cache = partial(_load_code_cache, allow_weights_mismatch=config.allow_tokenizer_weights_mismatch)
    if config.streaming:
        return build_streaming_mixture(config, factory, tokenizer_hash, pixel_images, visual_tokenizer)

    def tracker(task: str) -> BadSampleTracker:
        return BadSampleTracker(max_bad_fraction=config.max_bad_fraction, name=f"{task} data")

    sources: dict[str, tuple[TaskDataset, float]] = {}
    cache = None
    if config.caption_weight > 0 or config.t2i_weight > 0:
        if config.code_cache is None:
            raise OptionError("caption_weight/t2i_weight > 0 need code_cache (run scripts/pretokenize.py first)")
        cache = load_code_cache(config.code_cache, tokenizer_hash)
        if config.caption_weight > 0:
            sources["caption"] = (caption_dataset(cache, factory, tracker("caption")), config.caption_weight)
        if config.t2i_weight > 0:
            sources["t2i"] = (t2i_dataset(cache, factory, tracker("t2i")), config.t2i_weight)
    if config.conversation_weight > 0:
        if config.conversation_json is None:
            raise OptionError("conversation_weight > 0 needs conversation_json")
        records = read_llava_json(config.conversation_json)
        images = _conversation_images(config, pixel_images, cache, lambda path: load_code_cache(path, tokenizer_hash))
        sources["conversation"] = (conversation_dataset(records, factory, images, tracker("conversation")),
                                   config.conversation_weight)
    if config.text_weight > 0:
        if config.text_data is None:
            raise OptionError("text_weight > 0 needs text_data")
        sources["text"] = (text_dataset(read_text_records(config.text_data), factory, tracker("text")),
                           config.text_weight)
    return MixtureDataset(sources, config.num_samples, config.seed)


def _conversation_images(config: MixtureConfig, pixel_images: PixelImages | None, cache: Any | None,
                         load_cache: Callable[[str], Any]) -> ImageProvider | None:
    """Where conversation images come from (`understanding_input`). auto: the explicit conversation cache first,
    then continuous inputs (VQRAE understanding) when the model has a projector, then the main cache (`cache`, when
    the other tasks loaded it already); features and codes pin one kind, so a run can read text-to-image codes from
    code_cache and conversations from pixels."""
    mode = config.understanding_input
    if mode == "features":
        if pixel_images is None:
            raise ValueError("understanding_input=features needs a model with a feature projector (a new model, or a "
                             "model_path pretrained with understanding_input=features) and a visual tokenizer or "
                             "vision tower to encode the conversation images")
        return pixel_images
    if config.conversation_code_cache is not None:
        return CodeCacheImages(load_cache(config.conversation_code_cache))
    if mode == "auto" and pixel_images is not None:
        return pixel_images
    if config.code_cache is not None:
        return CodeCacheImages(cache if cache is not None else load_cache(config.code_cache))
    if mode == "codes":
        raise OptionError("understanding_input=codes needs conversation_code_cache or code_cache")
    return None


def build_streaming_mixture(config: MixtureConfig, factory: SampleFactory, tokenizer_hash: Any | None = None,
                            pixel_images: PixelImages | None = None,
                            visual_tokenizer: Any | None = None) -> StreamingMixture:
    """The `StreamingMixture` described by `config` (`streaming: true`): caption and text-to-image samples from
    `code_cache`'s shards (this node's; the manifest is checked against `tokenizer_hash`) or from `image_shards`
    encoded on the fly by `visual_tokenizer`, conversations and text
    from `conversation_json` / `text_data` (a file, or a folder of shard files). Conversation images come from a
    code cache opened whole (`conversation_code_cache`, keyed by image path) or from pixels, as in `build_mixture`."""
    from functools import partial

    from unimm.data.code_cache import load_code_cache

    def tracker(task: str) -> BadSampleTracker:
        return BadSampleTracker(max_bad_fraction=config.max_bad_fraction, name=f"{task} data")

    allow = config.allow_tokenizer_weights_mismatch
    tasks: list[StreamTask] = []
    if config.caption_weight > 0 or config.t2i_weight > 0:
        if config.image_shards is not None:
            shards = _encoded_image_shards(config, visual_tokenizer)
        elif config.code_cache is None:
            raise OptionError("caption_weight/t2i_weight > 0 need code_cache (run scripts/pretokenize.py first) or, "
                              "streaming, image_shards")
        else:
            shards = CodeCacheShards(config.code_cache, tokenizer_hash, allow)
        if not getattr(shards, "has_text", True):
            raise ValueError(f"code cache {config.code_cache} has no captions ('text' column); caption/t2i need them")
        for task, build, weight in (("caption", caption_builder, config.caption_weight),
                                    ("t2i", t2i_builder, config.t2i_weight)):
            if weight > 0:
                tasks.append(StreamTask(task, shards, build(factory), weight, tracker(task)))
    if config.conversation_weight > 0:
        if config.conversation_json is None:
            raise OptionError("conversation_weight > 0 needs conversation_json")
        load = partial(load_code_cache, expected_hash=tokenizer_hash, allow_weights_mismatch=allow)
        images = _conversation_images(config, pixel_images, None, load)
        tasks.append(StreamTask("conversation", JsonShards(config.conversation_json, "conversation"),
                                conversation_builder(factory, images), config.conversation_weight,
                                tracker("conversation")))
    if config.text_weight > 0:
        if config.text_data is None:
            raise OptionError("text_weight > 0 needs text_data")
        tasks.append(StreamTask("text", JsonShards(config.text_data, "text"), text_builder(factory),
                                config.text_weight, tracker("text")))
    return StreamingMixture(tasks, seed=config.seed, shuffle_window=config.shuffle_window,
                            look_ahead=config.look_ahead_batches)



def _encoded_image_shards(config: MixtureConfig, visual_tokenizer: Any | None) -> Any:
    """`image_shards` (webdataset tars or Parquet files) as code records, encoded by a CPU copy of the visual
    tokenizer: the stream runs in dataloader worker processes, which must not share the training device's model."""
    import copy

    from unimm.data.shards import ParquetShards, WebDatasetShards, encode

    if visual_tokenizer is None:
        raise OptionError(f"image_shards={config.image_shards} is encoded on the fly: it needs the model's visual "
                          f"tokenizer (visual_tokenizer_path)")
    files = str(config.image_shards)
    parquet = files.lower().endswith(".parquet") or (Path(files).is_dir() and any(Path(files).glob("*.parquet")))
    source = (ParquetShards(files, max_bad_fraction=config.max_bad_fraction) if parquet
              else WebDatasetShards(files, max_bad_fraction=config.max_bad_fraction))
    device = next(visual_tokenizer.parameters()).device
    encoder = visual_tokenizer if device.type == "cpu" else copy.deepcopy(visual_tokenizer).to("cpu")
    return encode(source, encoder.eval(), batch_size=config.encode_batch_size)
