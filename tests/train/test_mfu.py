"""FLOPs-per-token accounting of unimm.train.llm.mfu against hand counts."""

from __future__ import annotations

import pytest
import torch

from unimm.testing import tiny_llm_config
from unimm.train.llm.mfu import LLMShape, flops_per_token, gpu_peak_flops, mfu, resolve_peak_flops


def test_matmul_params_equal_the_models_linear_weights():
    from transformers import AutoModelForCausalLM

    config = tiny_llm_config("qwen2", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert LLMShape.from_config(config).matmul_params() == linear


def test_qwen25_05b_shape():
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads of 64, MLP 4864, vocab 151936 (tied head).
    config = tiny_llm_config("qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                             num_kv_heads=2, intermediate_size=4864)
    shape = LLMShape.from_config(config)
    per_layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864
    assert shape.matmul_params() == 24 * per_layer + 896 * 151936
    assert flops_per_token(shape, 2048) == 6 * shape.matmul_params() + 12 * 24 * 896 * 2048


def test_mfu_and_peaks():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("Some Unknown GPU") is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert resolve_peak_flops(2.0, torch.device("cpu"), torch.float32) == 2e12
    assert resolve_peak_flops(None, torch.device("cpu"), torch.float32) > 0
    with pytest.raises(ValueError, match="peak_tflops"):
        resolve_peak_flops(-1.0, torch.device("cpu"), torch.float32)
