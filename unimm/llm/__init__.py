"""unimm.llm: a Hugging Face causal LM extended to read and write discrete visual codes (docs/DESIGN.md §3).

Importing this package has no side effects; DeepSpeed is only imported where ZeRO-3 partitioned parameters are met.
"""

from unimm.llm.configuration import UniMMConfig
from unimm.llm.identity import VisualTokenizerMismatchError, check_visual_tokenizer, visual_tokenizer_identity
from unimm.llm.layout import (
    BOI_TOKEN,
    EOI_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    UNCOND_TOKEN,
    VocabLayout,
    encode_plain_text,
    t2i_prefix_ids,
)
from unimm.llm.modeling import UniMMCausalLMOutput, UniMMForCausalLM
from unimm.llm.vocab import extend_tokenizer_and_model

__all__ = [
    "BOI_TOKEN",
    "EOI_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "UNCOND_TOKEN",
    "UniMMCausalLMOutput",
    "UniMMConfig",
    "UniMMForCausalLM",
    "VisualTokenizerMismatchError",
    "VocabLayout",
    "encode_plain_text",
    "check_visual_tokenizer",
    "extend_tokenizer_and_model",
    "t2i_prefix_ids",
    "visual_tokenizer_identity",
]
