"""Training tasks: how records become `Sample`s, and the per-task datasets (the mixture of tasks is
`unimm.data.mixture`).

- caption (image -> text): `[BOS] <image> caption EOS`, the caption and EOS supervised;
- t2i (text -> image): `t2i_prefix_ids(prompt) codes <|eoi|>`, exactly the codes and `<|eoi|>` supervised; the
  prompt is replaced by the unconditional prefix with probability `uncond_prob`, decided by a hash of
  (seed, epoch, sample id), so the same sample gets the same decision on every worker and every rerun;
- conversation (LLaVA): chat-formatted turns, assistant answers and their end token supervised;
- text: `[BOS] text EOS`, all supervised.

Datasets here return `Sample`s; records that cannot be built are skipped (the next record is used) and counted
by a `BadSampleTracker`, which stops the run once too many were bad.

Each map-style task dataset also gives `length_hints()`: an estimated token length per record, computed from metadata
in a few vectorised passes (the code cache's image shape and caption column, a LLaVA file's turn texts and image
counts) without building a sample, so grouping batches by length (`--group_by_modality_length`) costs no pass over
the data at start-up. The estimate counts image positions exactly and text as UTF-8 bytes / `BYTES_PER_TOKEN`; it is
off by the tokenizer's deviation from that ratio (and the chat template's exact scaffolding), which is enough for
grouping: the sampler only sorts samples of one task by length inside a mega-batch, so similar estimates put samples
of similar lengths together, and an error costs some padding, never a wrong sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from unimm.data.bad_samples import BadSampleTracker
from unimm.data.images import ImageLoadError, ImageTransform, load_image, resolve_image_path
from unimm.data.sequence import ImageSlot, Sample, SampleError, SequenceBuilder, Text, TokenIds
from unimm.data.sources import llava_messages
from unimm.data.templates import ChatMessage, get_chat_format
from unimm.llm.layout import VocabLayout, t2i_prefix_ids
from unimm.utils.config import config_field

logger = logging.getLogger(__name__)

TASKS = ("caption", "t2i", "conversation", "text")
UNDERSTANDING_INPUTS = ("auto", "codes", "features")
# Length estimates (see the module doc): UTF-8 bytes per text token of English prose (measured 4.4-4.6 with
# Qwen2.5's tokenizer, 3.9-4.3 with Mistral's LLaMA tokenizer), and the template tokens around one chat turn (role
# header and end-of-turn marker).
BYTES_PER_TOKEN = 4.0
TURN_TOKENS = 5
IMAGE_PLACEHOLDER_BYTES = len("<image>")


@dataclass
class ChatFormatConfig:
    """How conversations are formatted, the same in training and at inference (`unimm.inference.chat`)."""

    chat_format: str = config_field("auto", "Conversation format: auto (the tokenizer's chat template, else "
                                    "llama-2), chat_template, llama-2, plain, or LLaVA's v1 / llava_llama_2 / "
                                    "llava_plain.")
    chat_end_token: str | None = config_field(None, "Token closing an assistant turn in the chat template "
                                              "(supervised); default: detected (<|im_end|> for Qwen).")
    system_prompt: str | None = config_field(None, "System message prepended to every conversation.")


@dataclass
class SampleConfig(ChatFormatConfig):
    """How records become token sequences."""

    max_length: int | None = config_field(2048, (
        "Maximum tokens per sample: text is cut at the right; a sample whose cut would split an image is dropped."))
    uncond_prob: float = config_field(0.1, (
        "Probability that a text-to-image prompt is replaced by the unconditional prefix (classifier-free guidance)."))
    seed: int = config_field(0, "Seed of per-sample random decisions (prompt dropout).")

    def __post_init__(self) -> None:
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")


def stable_uniform(seed: int, epoch: int, sample_id: str, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by its arguments (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{purpose}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SampleFactory:
    """Builds each task's `Sample` for one text tokenizer and vocabulary layout."""

    def __init__(self, text_tokenizer: PreTrainedTokenizerBase, layout: VocabLayout,
                 config: SampleConfig | None = None):
        self.text_tokenizer = text_tokenizer
        self.layout = layout
        self.config = config or SampleConfig()
        self.builder = SequenceBuilder(text_tokenizer, layout, self.config.max_length)
        self.chat_format = get_chat_format(text_tokenizer, self.config.chat_format, self.config.chat_end_token)

    def _bos(self) -> list[TokenIds]:
        bos = self.text_tokenizer.bos_token_id
        return [TokenIds([bos])] if bos is not None else []

    def _eos(self, sample_id: str) -> TokenIds:
        if self.text_tokenizer.eos_token_id is None:
            raise SampleError(sample_id, "the tokenizer has no EOS token to end the sample with")
        return TokenIds([self.text_tokenizer.eos_token_id], supervise=True)

    def caption(self, sample_id: str, caption: str, image: ImageSlot) -> Sample:
        if not caption or not caption.strip():
            raise SampleError(sample_id, "empty caption")
        segments = [*self._bos(), image, Text(caption, supervise=True), self._eos(sample_id)]
        return self.builder.build(segments, sample_id, "caption")

    def prompt_dropped(self, sample_id: str, epoch: int = 0) -> bool:
        return stable_uniform(self.config.seed, epoch, sample_id, "uncond") < self.config.uncond_prob

    def t2i(self, sample_id: str, prompt: str | None, codes: dict[str, torch.Tensor], epoch: int = 0) -> Sample:
        """`prompt=None` (or a dropped prompt) gives the unconditional prefix."""
        if prompt is not None and self.prompt_dropped(sample_id, epoch):
            prompt = None
        prefix = t2i_prefix_ids(self.text_tokenizer, self.layout, prompt)
        segments = [TokenIds(prefix), ImageSlot(codes=codes, supervise=True, include_boi=False)]
        return self.builder.build(segments, sample_id, "t2i")

    def conversation(self, record: dict, images: Sequence[ImageSlot]) -> Sample:
        messages = llava_messages(record, list(images), self.config.system_prompt)
        segments = self.chat_format.segments(messages, record["id"])
        return self.builder.build(segments, record["id"], "conversation")

    def generation_prompt(self, messages: Sequence[ChatMessage], sample_id: str = "prompt") -> Sample:
        """Chat-formatted inference prompt ending where the assistant's answer starts (no targets)."""
        segments = self.chat_format.segments(messages, sample_id, add_generation_prompt=True)
        return self.builder.build(segments, sample_id, "chat", require_supervision=False)

    def clip_length(self, lengths: np.ndarray) -> np.ndarray:
        """Length estimates cut at `max_length`, as samples are."""
        max_length = self.config.max_length
        return lengths if max_length is None else np.minimum(lengths, max_length)

    @property
    def num_bos(self) -> int:
        return int(self.text_tokenizer.bos_token_id is not None)

    def text(self, sample_id: str, text: str) -> Sample:
        if not text.strip():
            raise SampleError(sample_id, "empty text")
        return self.builder.build([*self._bos(), Text(text, supervise=True), self._eos(sample_id)], sample_id, "text")


# ---------------------------------------------------------------------------------------------- image inputs


class CodeCacheImages:
    """Image slots from a code cache: discrete codes (no tokenizer in the training step)."""

    def __init__(self, cache: Any):
        self.cache = cache

    @property
    def num_positions(self) -> int:
        """Positions of one image (the cache's code shape)."""
        return self.cache.image_positions

    def __call__(self, key: str, sample_id: str) -> ImageSlot:
        try:
            return ImageSlot(codes=self.cache.codes_for(key), image_key=key)
        except KeyError as err:
            raise SampleError(sample_id, str(err.args[0])) from err


class PixelImages:
    """Image slots with continuous inputs: the image is loaded and transformed here, and the training step encodes
    `pixel_values` into `num_positions` features (VQRAE understanding)."""

    def __init__(self, image_folder: str | os.PathLike | None, transform: ImageTransform, num_positions: int,
                 allow_outside_folder: bool = False):
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.transform = transform
        self.num_positions = num_positions
        self.allow_outside_folder = allow_outside_folder

    def __call__(self, key: str, sample_id: str) -> ImageSlot:
        try:
            # A path leaving image_folder (`..`, a symlink, an absolute path) is a bad record, skipped and counted.
            path = key if self.image_folder is None else resolve_image_path(key, self.image_folder,
                                                                            self.allow_outside_folder)
            image = load_image(path, sample_id)
        except ImageLoadError as err:
            raise SampleError(sample_id, str(err)) from err
        return ImageSlot(num_positions=self.num_positions, pixel_values=self.transform(image), image_key=key)


ImageProvider = Callable[[str, str], ImageSlot]


# ---------------------------------------------------------------------------------------------- task datasets


class _TaskRecords:
    """What both task datasets share: the records, the sample builder and the bad-record accounting."""

    def __init__(self, records: Any, build: Callable[[dict, int], Sample], task: str,
                 tracker: BadSampleTracker | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.records = records
        self.build = build
        self.task = task
        self.tracker = tracker or BadSampleTracker(name=f"{task} data")

    def _try_build(self, record: dict, epoch: int) -> Sample | None:
        """The built sample, or None (counted by the tracker) when the record raises `SampleError`."""
        try:
            sample = self.build(record, epoch)
        except SampleError as err:
            self.tracker.record_bad(err.sample_id, err.reason)
            return None
        self.tracker.record_ok()
        return sample


class TaskDataset(_TaskRecords, torch.utils.data.Dataset):
    """Map-style dataset: `build(record, epoch)` on `records[i]`. A record that raises `SampleError` is counted
    by `tracker` and replaced by the next one, so batches stay full and bad records never crash a worker.
    `hints()` returns the records' estimated lengths (`length_hints`)."""

    def __init__(self, records: Any, build: Callable[[dict, int], Sample], task: str,
                 tracker: BadSampleTracker | None = None, hints: Callable[[], np.ndarray] | None = None):
        super().__init__(records, build, task, tracker)
        self.hints = hints
        self._length_hints: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    def length_hints(self) -> np.ndarray:
        """Estimated token length of each record (int64 [len(self)]), from metadata: no sample is built. Computed
        once; see the module doc for why an estimate is enough."""
        if self._length_hints is None:
            if self.hints is None:
                raise ValueError(f"{self.task} data has no length estimate (a TaskDataset made without hints)")
            hints = np.asarray(self.hints(), dtype=np.int64)
            if hints.shape != (len(self),):
                raise ValueError(f"{self.task} data: {hints.shape} length hints for {len(self)} records")
            self._length_hints = hints
        return self._length_hints

    def get(self, index: int, epoch: int = 0) -> Sample:
        for attempt in range(len(self)):
            sample = self._try_build(self.records[(index + attempt) % len(self)], epoch)
            if sample is not None:
                return sample
        self.tracker.check(final=True)
        raise RuntimeError(f"{self.task} data: no record could be built")

    def __getitem__(self, index: int) -> Sample:
        return self.get(index)


class IterableTaskDataset(_TaskRecords, torch.utils.data.IterableDataset):
    """Streaming counterpart of `TaskDataset` (records from a streaming reader): yields built samples, skipping and
    counting bad records. With DataLoader workers each worker reads every `num_workers`-th record."""

    def __init__(self, records: Any, build: Callable[[dict, int], Sample], task: str,
                 tracker: BadSampleTracker | None = None, epoch: int = 0):
        super().__init__(records, build, task, tracker)
        self.epoch = epoch

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        for position, record in enumerate(self.records):
            if worker is not None and position % worker.num_workers != worker.id:
                continue
            sample = self._try_build(record, self.epoch)
            if sample is not None:
                yield sample
        self.tracker.check(final=True)


def _task_dataset(records: Any, build: Callable[[dict, int], Sample], task: str, tracker: BadSampleTracker | None,
                  hints: Callable[[], np.ndarray]) -> TaskDataset | IterableTaskDataset:
    """A map-style `TaskDataset`, or an `IterableTaskDataset` for streaming records (no length)."""
    if isinstance(records, torch.utils.data.IterableDataset) or not hasattr(records, "__len__"):
        return IterableTaskDataset(records, build, task, tracker)
    return TaskDataset(records, build, task, tracker, hints)


# Each task's record -> sample step, `build(record, epoch)`, shared by the map-style task datasets below and the
# streaming mixture (`unimm.data.streaming`). Code-cache records carry `codes` as {group: [N, D] integer array}.
Builder = Callable[[dict, int], Sample]


def _code_tensors(codes: dict) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value, dtype=torch.long) for name, value in codes.items()}


def caption_builder(factory: SampleFactory) -> Builder:
    """Caption samples from code-cache records (`id`, `text`, `codes`)."""
    return lambda row, epoch: factory.caption(row["id"], row["text"], ImageSlot(
        codes=_code_tensors(row["codes"]), image_key=row["id"]))


def t2i_builder(factory: SampleFactory) -> Builder:
    """Text-to-image samples from code-cache records, the caption as prompt (dropped by `uncond_prob`)."""
    return lambda row, epoch: factory.t2i(row["id"], row["text"], _code_tensors(row["codes"]), epoch)


def conversation_builder(factory: SampleFactory, images: ImageProvider | None) -> Builder:
    """Conversation samples from normalised LLaVA records; `images` turns an image reference into a slot."""

    def build(record: dict, epoch: int) -> Sample:
        refs = record.get("images") or []
        if refs and images is None:
            raise SampleError(record["id"], "record has an image but no image source (code cache or folder) is set")
        return factory.conversation(record, [images(ref, record["id"]) for ref in refs])

    return build


def text_builder(factory: SampleFactory) -> Builder:
    """Text-only samples from records with `id` and `text`."""
    return lambda row, epoch: factory.text(row["id"], row["text"])


def text_tokens_estimate(num_bytes: np.ndarray) -> np.ndarray:
    """Estimated tokens of texts of `num_bytes` UTF-8 bytes (see the module doc)."""
    return np.ceil(np.asarray(num_bytes, dtype=np.float64) / BYTES_PER_TOKEN).astype(np.int64)


def caption_dataset(cache: Any, factory: SampleFactory, tracker: BadSampleTracker | None = None) -> TaskDataset:
    """Caption samples from a code cache that stores captions (`text`)."""
    if not cache.has_text:
        raise ValueError(f"code cache {cache.path} has no captions ('text' column); caption/t2i need them")

    def hints() -> np.ndarray:  # [BOS] <|boi|> codes <|eoi|> caption EOS
        return factory.clip_length(factory.num_bos + cache.image_positions + 2
                                   + text_tokens_estimate(cache.text_bytes()) + 1)

    return TaskDataset(cache, caption_builder(factory), "caption", tracker, hints)


def t2i_dataset(cache: Any, factory: SampleFactory, tracker: BadSampleTracker | None = None) -> TaskDataset:
    """Text-to-image samples from a code cache with captions as prompts."""
    if not cache.has_text:
        raise ValueError(f"code cache {cache.path} has no captions ('text' column); caption/t2i need them")

    def hints() -> np.ndarray:  # [BOS] prompt <|boi|> codes <|eoi|> (a dropped prompt is shorter: not estimated)
        return factory.clip_length(factory.num_bos + text_tokens_estimate(cache.text_bytes())
                                   + 1 + cache.image_positions + 1)

    return TaskDataset(cache, t2i_builder(factory), "t2i", tracker, hints)


def conversation_dataset(records: Any, factory: SampleFactory, images: ImageProvider | None,
                         tracker: BadSampleTracker | None = None) -> TaskDataset | IterableTaskDataset:
    """LLaVA conversation samples (records from `read_llava_json`, streaming or not); `images` turns an image
    reference into a slot (`CodeCacheImages` or `PixelImages`); text-only records need none."""

    build = conversation_builder(factory, images)

    def hints() -> np.ndarray:  # turn texts without their <image> placeholders, template per turn, image spans
        from unimm.data.sources import llava_length_stats

        text_bytes, num_turns, num_images = llava_length_stats(records)
        image_positions = getattr(images, "num_positions", 0) + 2 if images is not None else 0
        system = factory.config.system_prompt
        system_tokens = TURN_TOKENS + text_tokens_estimate(len(system.encode())) if system else 0
        text = text_tokens_estimate(np.maximum(text_bytes - IMAGE_PLACEHOLDER_BYTES * num_images, 0))
        return factory.clip_length(factory.num_bos + system_tokens + text + TURN_TOKENS * num_turns
                                   + image_positions * num_images)

    return _task_dataset(records, build, "conversation", tracker, hints)


def text_dataset(records: Any, factory: SampleFactory,
                 tracker: BadSampleTracker | None = None) -> TaskDataset | IterableTaskDataset:
    """Text-only samples (records with `id`, `text`; streaming or not)."""
    from unimm.data.sources import text_bytes

    def hints() -> np.ndarray:  # [BOS] text EOS
        return factory.clip_length(factory.num_bos + text_tokens_estimate(text_bytes(records, "text")) + 1)

    return _task_dataset(records, text_builder(factory), "text", tracker, hints)
