"""ZeRO-3 on 2 CPU ranks: an extended model trains, saves gathered weights, and reloads in one process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from unimm.llm import UniMMForCausalLM
from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group
from unimm.utils.imports import is_deepspeed_available

SCRIPT = Path(__file__).with_name("zero3_train.py")


@pytest.mark.slow
@pytest.mark.skipif(not is_deepspeed_available() or shutil.which("deepspeed") is None and
                    not (Path(sys.executable).parent / "deepspeed").exists(), reason="needs deepspeed")
def test_zero3_two_cpu_ranks_train_save_reload(tiny_qwen2_path, tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out_dir = tmp_path / "zero3_out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPT),
           "--llm", str(tiny_qwen2_path), "--out", str(out_dir)]
    build_deepspeed_comm_op(env)
    proc = run_process_group(cmd, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    saved = torch.load(out_dir / "logits.pt", weights_only=False)
    assert all(torch.isfinite(torch.tensor(saved["train_losses"])))
    model = UniMMForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        out = model(**saved["batch"], return_logits=True)
    torch.testing.assert_close(out.logits, saved["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, saved["loss"], rtol=1e-4, atol=1e-4)
    assert saved["train_losses"][-1] < saved["train_losses"][0]  # the ZeRO-3 steps trained the model
