"""Every Python example in README.md runs. The names an example leaves to the reader (`pixel_values`,
`text_tokenizer`) and its placeholder paths are bound to tiny stand-ins; any other undefined name fails the test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tiny_qwen2_path, monkeypatch):
    from transformers import AutoTokenizer

    code = BLOCKS[index].replace('"path/to/qwen2"', repr(str(tiny_qwen2_path)))
    assert "path/to/" not in code, "a placeholder path without a stand-in; add it here"
    torch.manual_seed(0)
    namespace = {"pixel_values": torch.randn(1, 3, 32, 32),
                 "text_tokenizer": AutoTokenizer.from_pretrained(tiny_qwen2_path)}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    if "generate_images" in code:
        codes, tok = namespace["codes"], namespace["tok"]
        assert {name: tuple(c.shape) for name, c in codes.items()} == {
            name: (1, tok.num_positions, spec.depth) for name, spec in tok.codebook_spec.items()}
