"""Vocabulary layout: where UniMM's special tokens and (in flat mode) the visual codes sit in the LLM's
vocabulary. The one place that decides these ids; the data layer and the model both read it.

Image spans in every sequence are `<|boi|> v_1 ... v_N <|eoi|>`. Each visual position v_i holds
`image_token_id` in `input_ids` (its embedding comes from its codes, or from continuous features for VQRAE
understanding); in flat mode (one codebook, depth 1) v_i holds the token `code_token_offset + code`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from unimm.utils.config import renamed_arguments

BOI_TOKEN = "<|boi|>"
EOI_TOKEN = "<|eoi|>"
IMAGE_TOKEN = "<|image|>"
UNCOND_TOKEN = "<|uncond|>"
SPECIAL_TOKENS = (BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, UNCOND_TOKEN)
IGNORE_INDEX = -100

Codes = TypeVar("Codes", int, torch.Tensor)


@dataclass
class VocabLayout:
    """Token ids added by `extend_tokenizer_and_model`, stored in `UniMMConfig` and saved with the model."""

    boi_token_id: int
    eoi_token_id: int
    image_token_id: int
    uncond_token_id: int
    original_vocab_size: int
    padded_vocab_size: int
    # group name -> {"num_codes", "depth", "code_dim"} (see unimm.tokenizer.types.CodebookGroupSpec)
    codebook_spec: dict[str, dict[str, int]] = field(default_factory=dict)
    flat_codes: bool = False
    code_token_offset: int | None = None  # flat mode: code k <-> token id code_token_offset + k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VocabLayout:
        return cls(**data)

    @property
    def num_flat_codes(self) -> int:
        if not self.flat_codes:
            return 0
        (group,) = self.codebook_spec.values()
        return group["num_codes"]

    # -- flat mode: the one place for the code <-> token id arithmetic ---------------------------------------
    @property
    def code_token_range(self) -> tuple[int, int] | None:
        """`[start, stop)` of the code tokens in the vocabulary (flat mode), else None."""
        if not self.flat_codes:
            return None
        return int(self.code_token_offset), int(self.code_token_offset) + self.num_flat_codes

    def code_to_token(self, codes: Codes) -> Codes:
        """Token id(s) of flat-mode code(s) `k -> code_token_offset + k` (an int or a tensor of codes)."""
        return codes + self._flat_offset()

    def token_to_code(self, token_ids: Codes) -> Codes:
        return token_ids - self._flat_offset()

    def is_code_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of `token_ids` that are flat-mode code tokens (all False outside flat mode)."""
        code_range = self.code_token_range
        if code_range is None:
            return torch.zeros_like(token_ids, dtype=torch.bool)
        return (token_ids >= code_range[0]) & (token_ids < code_range[1])

    def _flat_offset(self) -> int:
        if not self.flat_codes or self.code_token_offset is None:
            raise ValueError("code tokens exist only in flat mode (VocabLayout.flat_codes with a code_token_offset)")
        return int(self.code_token_offset)


@renamed_arguments(tokenizer="text_tokenizer")
def encode_plain_text(text_tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenise user-provided text so that strings spelling special tokens (`<|boi|>`, `<|im_end|>` ...)
    stay plain text and can never inject a control token. No BOS/EOS is added."""
    return text_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@renamed_arguments(tokenizer="text_tokenizer")
def t2i_prefix_ids(text_tokenizer: PreTrainedTokenizerBase, layout: VocabLayout, prompt: str | None) -> list[int]:
    """The token ids that precede an image's codes in a text-to-image sample, ending with `<|boi|>`.

    `prompt=None` gives the unconditional prefix used for prompt dropout in training and for the
    unconditional branch of classifier-free guidance. Training (unimm.data) and generation (unimm.llm)
    both call this function, so the two can never disagree on the format.
    """
    ids: list[int] = [text_tokenizer.bos_token_id] if text_tokenizer.bos_token_id is not None else []
    if prompt is None:
        ids.append(layout.uncond_token_id)
    else:
        ids.extend(encode_plain_text(text_tokenizer, prompt))
    ids.append(layout.boi_token_id)
    return ids
