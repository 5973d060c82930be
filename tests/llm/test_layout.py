"""`VocabLayout`'s flat-mode code <-> token mapping: the one place for `code_token_offset + code`."""

from __future__ import annotations

import pytest
import torch

from unimm.llm.layout import VocabLayout


def _layout(flat: bool) -> VocabLayout:
    spec = {"semantic": {"num_codes": 64, "depth": 1, "code_dim": 8}}
    return VocabLayout(boi_token_id=500, eoi_token_id=501, image_token_id=502, uncond_token_id=503,
                       original_vocab_size=500, padded_vocab_size=640, codebook_spec=spec, flat_codes=flat,
                       code_token_offset=504 if flat else None)


def test_flat_codes_map_to_one_contiguous_token_block_and_back():
    layout = _layout(flat=True)
    assert layout.code_token_range == (504, 568)
    codes = torch.tensor([0, 5, 63])
    tokens = layout.code_to_token(codes)
    assert tokens.tolist() == [504, 509, 567] and layout.code_to_token(7) == 511
    assert torch.equal(layout.token_to_code(tokens), codes)
    ids = torch.tensor([[503, 504, 567, 568, 502]])
    assert layout.is_code_token(ids).tolist() == [[False, True, True, False, False]]


def test_without_flat_mode_there_are_no_code_tokens():
    layout = _layout(flat=False)
    assert layout.code_token_range is None
    assert not layout.is_code_token(torch.arange(600)).any()
    with pytest.raises(ValueError, match="flat mode"):
        layout.code_to_token(torch.tensor([1]))
