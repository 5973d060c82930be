"""Model FLOPs utilisation (MFU) for decoder-only LLMs shaped like Qwen2 / LLaMA.

FLOPs per trained token follow the usual accounting (Kaplan et al.; PaLM appendix B): a matmul weight of
P parameters costs 2P FLOPs per token forward and 4P backward, so 6P per token; self-attention adds
`12 * num_layers * num_heads * head_dim * seq_len` (PaLM's term, which counts the full score matrix and
is what published MFU figures use, so no halving for causality).
Embedding lookups cost nothing; the LM head is a matmul and counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense bf16 peak (no sparsity) per device, FLOP/s. Matched against `torch.cuda.get_device_name()`.
_GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("4090", 165e12),
    ("V100", 125e12),
)


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs estimate needs from a causal-LM config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> LLMShape:
        """Read a Qwen2/Qwen3/LLaMA-style `PretrainedConfig` (or a UniMMConfig wrapping one as `.llm_config`)."""
        config = getattr(config, "llm_config", None) or getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
        )

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul for every token (attention, gated MLP, LM head)."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        return self.num_layers * (q_and_o + k_and_v + mlp) + self.hidden_size * self.vocab_size


def flops_per_token(shape: LLMShape, seq_len: int, extra_matmul_params: int = 0) -> float:
    """Training FLOPs (forward + backward) per token at context length `seq_len`.

    `extra_matmul_params` adds per-token matmul weights outside the LLM (visual projector, depth heads).
    """
    dense = 6 * (shape.matmul_params() + extra_matmul_params)
    attention = 12 * shape.num_layers * shape.num_heads * shape.head_dim * seq_len
    return float(dense + attention)


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a known GPU name, else None."""
    for key, peak in _GPU_PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                         device: str | torch.device = "cpu") -> float:
    """Achieved FLOP/s of a square matmul on `device`: the practical peak used for MFU on CPUs, which have no
    single published figure."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * repeats / elapsed


def resolve_peak_flops(peak_tflops: float | None, device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s per device: the configured value, the GPU table, or a measured matmul rate on CPU."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak
        return measure_matmul_flops(dtype, size=4096, device=device)
    return measure_matmul_flops(torch.float32)


def mfu(tokens_per_second: float, flops_per_token_value: float, peak_flops_total: float) -> float:
    """Fraction of the hardware peak achieved: tokens/s x FLOPs/token / peak FLOP/s (all devices together)."""
    return tokens_per_second * flops_per_token_value / peak_flops_total
