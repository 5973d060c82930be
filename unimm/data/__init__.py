"""unimm.data: readers, sequence building, tasks, code cache and collation for UniMM training (docs/DESIGN.md §4)."""

from unimm.data.bad_samples import BadSampleTracker, TooManyBadSamplesError
from unimm.data.code_cache import (
    CodeCache,
    CodeCacheCorruptError,
    CodeCacheMismatchError,
    TokenizerIdentity,
    finalize_code_cache,
    load_code_cache,
    tokenizer_weights_hash,
    verify_code_cache,
)
from unimm.data.collator import GroupedBatchSampler, UniMMCollator
from unimm.data.images import (
    ImageDataset,
    ImageLoadError,
    ImageTransform,
    collate_images,
    load_image,
    read_image_records,
)
from unimm.data.mixture import MixtureConfig, MixtureDataset, build_mixture, build_streaming_mixture
from unimm.data.pretokenize import PretokenizeConfig, run_pretokenize
from unimm.data.sequence import (
    ImageSlot,
    MalformedRecordError,
    Sample,
    SampleError,
    SampleTooLongError,
    SequenceBuilder,
    Text,
    TokenIds,
)
from unimm.data.shards import CodeCacheShards, JsonShards, LlavaJsonShards, ShardSource
from unimm.data.sources import llava_messages, read_llava_json, read_text_records
from unimm.data.streaming import StreamingMixture
from unimm.data.tasks import (
    CodeCacheImages,
    IterableTaskDataset,
    PixelImages,
    SampleConfig,
    SampleFactory,
    TaskDataset,
    caption_dataset,
    conversation_dataset,
    t2i_dataset,
    text_dataset,
)
from unimm.data.templates import ChatMessage, get_chat_format

__all__ = [
    "BadSampleTracker",
    "ChatMessage",
    "CodeCache",
    "CodeCacheImages",
    "CodeCacheShards",
    "CodeCacheCorruptError",
    "CodeCacheMismatchError",
    "GroupedBatchSampler",
    "ImageDataset",
    "ImageLoadError",
    "ImageSlot",
    "ImageTransform",
    "JsonShards",
    "LlavaJsonShards",
    "IterableTaskDataset",
    "MalformedRecordError",
    "MixtureConfig",
    "MixtureDataset",
    "PixelImages",
    "PretokenizeConfig",
    "Sample",
    "SampleConfig",
    "SampleError",
    "SampleFactory",
    "SampleTooLongError",
    "SequenceBuilder",
    "ShardSource",
    "StreamingMixture",
    "TaskDataset",
    "Text",
    "TokenIds",
    "TooManyBadSamplesError",
    "UniMMCollator",
    "build_mixture",
    "build_streaming_mixture",
    "caption_dataset",
    "collate_images",
    "conversation_dataset",
    "TokenizerIdentity",
    "finalize_code_cache",
    "tokenizer_weights_hash",
    "verify_code_cache",
    "get_chat_format",
    "llava_messages",
    "load_code_cache",
    "load_image",
    "read_image_records",
    "read_llava_json",
    "read_text_records",
    "run_pretokenize",
    "t2i_dataset",
    "text_dataset",
]
