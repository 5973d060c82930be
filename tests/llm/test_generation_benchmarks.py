"""The generation benchmarks run end to end at toy sizes, so they cannot rot: `benchmarks/gpu_suite.sh --device cpu
--tiny` (the first GPU's measurements) and `benchmarks/generation.py --variants` (the decode-variant table)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_gpu_suite_runs_on_cpu_tiny():
    out = _run(["bash", "benchmarks/gpu_suite.sh", "--device", "cpu", "--tiny"], timeout=900)
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", out, flags=re.M))
    assert "compile backend aot_eager" in out
    for layout in ("VQRAE", "DualToken"):
        tokens, share = re.match(r"([\d,]+) tokens/s, MFU ([\d.]+)%", rows[f"pretrain {layout}: tokens/s, MFU"]).groups()
        assert float(tokens.replace(",", "")) > 0 and float(share) > 0
    assert re.match(r"\d+% \(", rows["depth heads' share of the DualToken step"])
    decode_rows = [label for label in rows if label.startswith("t2i image tokens/s")]
    for mode in ("eager", "static", "compile", "jacobi", "jacobi-compile"):
        assert any(label.endswith(f", {mode}") for label in decode_rows), mode
    assert {"batch 1", "batch 2"} <= {label.split(", ")[3] for label in decode_rows}
    for label in decode_rows:
        assert float(rows[label].split(",")[0].replace(",", "")) > 0
    encode = [figure for label, figure in rows.items() if label.startswith("visual tokenizer encode")]
    assert len(encode) == 2 and all(figure.endswith("images/s") for figure in encode)


def test_generation_benchmark_variant_table():
    out = _run([sys.executable, "benchmarks/generation.py", "--variants", "hf", "eager", "static", "jacobi",
                "--positions", "9", "--batch", "1", "2", "--repeats", "1", "--hidden", "32", "--layers", "1",
                "--vocab", "600", "--num-codes", "64", "--window", "4"], timeout=300)
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"^\| 9 \| [12] \|", line)]
    assert {(r[1], r[2]) for r in rows} == {(b, v) for b in ("1", "2") for v in ("hf", "eager", "static", "jacobi")}
    for row in rows:
        forwards, same = int(row[6]), row[8]
        if row[2] == "hf":
            assert forwards == 18  # a conditional and an unconditional forward per position
        elif row[2] in ("eager", "static"):
            assert forwards == 9 and same == "1.000"
        else:
            assert 2 <= forwards <= 9 and same == "1.000"  # Jacobi: the greedy codes of sequential decoding
