"""Quantizers: nearest-code search, SimVQ (with parity against vector_quantize_pytorch), EMA residual VQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from unimm.tokenizer.quantizers import ResidualVQ, SimVQ, UsageWindow, nearest_code, perplexity, plan_search
from unimm.tokenizer.quantizers.residual_vq import draw_distinct
from unimm.tokenizer.types import QuantizerOutput

# ---------------------------------------------------------------------------------------------------- search


def test_chunked_search_matches_naive_cdist_argmin():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 16, generator=gen)
    codebook = torch.randn(300, 16, generator=gen)
    budget = 64 * 1024  # forces many chunks
    plan = plan_search(1000, 300, 16, budget, with_distances=True)
    assert plan.num_chunks > 5 and plan.peak_extra_bytes <= budget
    indices, distances = nearest_code(z, codebook, budget, return_distances=True)
    naive = torch.cdist(z, codebook)
    assert indices.dtype == torch.long and indices.shape == (1000,)
    assert torch.equal(indices, naive.argmin(dim=1))
    torch.testing.assert_close(distances, naive.min(dim=1).values.pow(2), rtol=1e-4, atol=1e-4)
    # One chunk (large budget) gives the same answer.
    assert torch.equal(nearest_code(z, codebook), indices)


def test_search_runs_in_float32_for_bfloat16_inputs():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(257, 32, generator=gen).bfloat16()
    codebook = torch.randn(64, 32, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices, distances = nearest_code(z, codebook, 16 * 1024, return_distances=True)
    assert distances.dtype == torch.float32
    assert torch.equal(indices, torch.cdist(z.float(), codebook.float()).argmin(dim=1))


def test_search_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        nearest_code(torch.randn(4, 8), torch.randn(1024, 8), memory_budget_bytes=1024)


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from unimm.tokenizer.quantizers import nearest_code, plan_search

    torch.set_num_threads(1)
    budget = int(sys.argv[1])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1024, 256, generator=gen)
    codebook = torch.randn(4096, 256, generator=gen)  # 4 MiB: a [K, d] temporary would exceed the budget
    # Warm-up with the same shapes: the first GEMM of a shape allocates BLAS kernels/buffers that are kept.
    nearest_code(z, codebook, budget)
    def rss_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    def reset_peak():  # Linux >= 4.0: set the high-water mark VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    reset_peak()
    before = rss_kib("VmRSS")
    chunked = nearest_code(z, codebook, budget)
    chunked_extra = rss_kib("VmHWM") - before
    reset_peak()
    before = rss_kib("VmRSS")
    naive = torch.cdist(z, codebook).argmin(dim=1)
    naive_extra = rss_kib("VmHWM") - before
    plan = plan_search(1024, 4096, 256, budget)
    print(json.dumps({
        "chunked_extra": chunked_extra * 1024, "naive_extra": naive_extra * 1024,
        "equal": bool(torch.equal(chunked, naive)), "plan_peak": plan.peak_extra_bytes,
        "chunks": plan.num_chunks,
    }))
    """
)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_search_peak_memory_stays_under_budget_measured_by_rss():
    """Measures the peak resident memory (Linux VmHWM, reset to the current RSS just before) in a fresh
    interpreter around the search.

    The naive cdist over the same shapes (a 16 MiB [1024, 4096] matrix) runs afterwards in the same process as
    a control: it must register as a large increase, which shows the measurement can see such blocks.
    What is measured is the steady state: the search runs once before, because the first GEMM of a new shape
    allocates BLAS kernels and buffers (a few MiB) that stay for later calls."""
    budget = 2 * 1024**2
    # A fixed mmap threshold makes glibc map every block >= 64 KiB on its own and unmap it on free, so resident
    # memory follows the live tensors instead of heap fragmentation (the default threshold adapts and keeps
    # freed blocks in the heap, which made VmHWM vary by tens of MiB between identical calls).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["equal"]
    assert measured["chunks"] > 1 and measured["plan_peak"] <= budget
    slack = 1024**2  # the index output, BLAS workspace, page granularity
    assert measured["chunked_extra"] <= budget + slack, measured
    assert measured["naive_extra"] >= 12 * 1024**2, measured


@pytest.mark.gpu
def test_search_peak_cuda_memory_stays_under_budget():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(65536, 256, device=device, generator=gen)
    codebook = torch.randn(16384, 256, device=device, generator=gen)
    budget = 64 * 1024**2
    nearest_code(z[:16], codebook, budget)  # warm-up (cuBLAS workspace)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    indices, distances = nearest_code(z, codebook, budget, return_distances=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    outputs = indices.numel() * (8 + 4)
    assert peak <= budget + outputs, (peak, budget)
    # The chosen code is a nearest one (up to float32 rounding of near-ties).
    sample = slice(0, 4096)
    exact = torch.cdist(z[sample].double(), codebook.double()).pow(2)
    chosen = exact.gather(1, indices[sample, None]).squeeze(1)
    torch.testing.assert_close(chosen, exact.min(dim=1).values, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(distances[sample].double(), chosen, rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------------------- usage


def test_usage_window_counts_codes_seen_in_recent_steps():
    usage = UsageWindow(num_codes=4, window=2)
    for used in ([0], [1], [2]):
        counts = torch.zeros(4)
        counts[used] = 1
        usage.update(counts)
    # Window of 2 steps: codes 1 and 2.
    assert usage.utilisation().tolist() == [0.5]
    assert perplexity(torch.tensor([2.0, 2.0, 0.0, 0.0])).item() == pytest.approx(2.0)
    assert perplexity(torch.tensor([5.0, 0.0])).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- SimVQ


def test_simvq_output_contract_and_eval_lookup():
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=64, dim=16)
    z = torch.randn(2, 5, 7, 16)
    out = quantizer(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 7)
    assert out.indices.dtype == torch.long
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 64
    assert out.loss.dim() == 0
    assert {"utilisation", "perplexity", "batch_utilisation"} <= set(out.stats)
    quantizer.eval()
    out = quantizer(z)
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)
    # The quantized vectors are the nearest rows of W(C).
    expected = torch.cdist(z.reshape(-1, 16), quantizer.codebook.detach()).argmin(dim=1)
    assert torch.equal(out.indices.reshape(-1), expected)
    with pytest.raises(ValueError, match="code indices"):
        quantizer.lookup(torch.tensor([64]))
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        quantizer(torch.randn(3, 8))


def test_simvq_lookup_goes_through_the_linear_map():
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=32, dim=8)
    indices = torch.tensor([[3, 7, 31]])
    expected = quantizer.codebook_proj(quantizer.frozen_codebook[indices])
    torch.testing.assert_close(quantizer.lookup(indices), expected)
    assert not torch.allclose(quantizer.lookup(indices), quantizer.frozen_codebook[indices])


def test_simvq_straight_through_gradients_reach_input_and_linear_only():
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=32, dim=8)
    z = torch.randn(4, 6, 8, requires_grad=True)
    out = quantizer(z)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity through the straight-through estimator
    assert quantizer.codebook_proj.weight.grad is None  # the reconstruction path does not train W
    out = quantizer(z)
    out.loss.backward()
    assert quantizer.codebook_proj.weight.grad.abs().sum() > 0
    assert quantizer.codebook_proj.bias.grad.abs().sum() > 0
    assert not quantizer.frozen_codebook.requires_grad
    assert "frozen_codebook" not in dict(quantizer.named_parameters())


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_simvq_loss_matches_hand_formula(beta_on):
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=16, dim=4, beta=0.3, beta_on=beta_on)
    z = torch.randn(10, 4)
    out = quantizer(z)
    codes = quantizer.codebook[out.indices]
    commitment = ((codes.detach() - z) ** 2).mean()
    codebook_term = ((codes - z.detach()) ** 2).mean()
    if beta_on == "commitment":
        expected = 0.3 * commitment + codebook_term
    else:
        expected = commitment + 0.3 * codebook_term
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="beta_on"):
        SimVQ(num_codes=16, dim=4, beta_on="encoder")


def test_simvq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    num_codes, dim, beta = 128, 24, 0.25
    ours = SimVQ(num_codes=num_codes, dim=dim, beta=beta, beta_on="commitment")
    reference = vqp.SimVQ(
        dim=dim, codebook_size=num_codes, rotation_trick=False, input_to_quantize_commit_loss_weight=beta
    )
    with torch.no_grad():
        reference.frozen_codebook.copy_(ours.frozen_codebook)
        reference.code_transform.weight.copy_(ours.codebook_proj.weight)
        ours.codebook_proj.bias.zero_()
    z = torch.randn(3, 50, dim)
    out = ours(z)
    ref_quantized, ref_indices, ref_loss = reference(z)
    assert torch.equal(out.indices, ref_indices)
    torch.testing.assert_close(out.quantized, ref_quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(ours.lookup(out.indices), reference.indices_to_codes(ref_indices))


def test_simvq_state_dict_reload_gives_identical_codes():
    torch.manual_seed(0)
    first = SimVQ(num_codes=32, dim=8)
    torch.manual_seed(1)
    second = SimVQ(num_codes=32, dim=8)
    assert not torch.equal(first.codebook, second.codebook)
    assert "frozen_codebook" in first.state_dict()
    second.load_state_dict(first.state_dict())
    assert torch.equal(first.codebook, second.codebook)


def test_simvq_bfloat16_module_and_autocast_search_in_float32():
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=64, dim=16).bfloat16()
    assert quantizer.frozen_codebook.dtype == torch.float32  # frozen codes are not rounded
    assert quantizer.codebook_proj.weight.dtype == torch.bfloat16
    z = torch.randn(40, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.quantized.dtype == torch.bfloat16
    expected = torch.cdist(z.float(), quantizer.codebook.detach()).argmin(dim=1)
    assert torch.equal(out.indices, expected)


def test_simvq_window_utilisation_in_training():
    torch.manual_seed(0)
    quantizer = SimVQ(num_codes=8, dim=4, usage_window=3)
    quantizer.train()
    codebook = quantizer.codebook.detach()
    for code in range(4):  # one code per step, each step exactly at a code
        out = quantizer(codebook[code : code + 1])
    assert out.stats["batch_utilisation"].item() == pytest.approx(1 / 8)
    assert out.stats["utilisation"].item() == pytest.approx(3 / 8)


# ---------------------------------------------------------------------------------------------------- ResidualVQ


def test_residual_vq_contract_gradients_and_eval_lookup():
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=32, dim=8, depth=3)
    assert list(quantizer.parameters()) == []  # EMA codebooks are buffers
    z = torch.randn(2, 10, 8, requires_grad=True)
    out = quantizer(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 10, 3)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 32
    upstream = torch.randn_like(z)
    ((out.quantized * upstream).sum() + out.loss).backward()
    assert not quantizer.codebooks.requires_grad and quantizer.codebooks.grad is None
    # Gradient = straight-through identity + beta * d(commitment)/dz.
    assert z.grad is not None and torch.isfinite(z.grad).all()
    quantizer.eval()
    frozen = quantizer.codebooks.clone()
    out = quantizer(z.detach())
    assert torch.equal(quantizer.codebooks, frozen)  # no EMA update in eval mode
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)
    per_depth = quantizer.embed_codes(out.indices)
    assert per_depth.shape == (2, 10, 3, 8)
    torch.testing.assert_close(per_depth.sum(dim=-2), out.quantized)


def test_residual_vq_commitment_loss_is_cumulative():
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=16, dim=4, depth=3, beta=0.5).eval()
    z = torch.randn(20, 4)
    out = quantizer(z)
    partial = [quantizer.lookup(out.indices[..., : d + 1]) for d in range(3)]
    expected = 0.5 * torch.stack([((z - p) ** 2).mean() for p in partial]).mean()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("shared_codebook", [True, False])
def test_residual_error_decreases_with_depth(shared_codebook):
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=32, dim=8, depth=4, shared_codebook=shared_codebook)
    data = torch.randn(512, 8)
    for _ in range(30):
        quantizer(data[torch.randperm(512)[:256]])
    quantizer.eval()
    out = quantizer(data)
    errors = [(data - quantizer.lookup(out.indices[..., : d + 1])).pow(2).mean().item() for d in range(4)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    assert torch.equal(quantizer.lookup(out.indices), out.quantized)
    assert quantizer.codebooks.shape[0] == (1 if shared_codebook else 4)


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=3, dim=2, depth=1, decay=0.9, eps=1e-5, restart_threshold=0.0)
    with torch.no_grad():
        quantizer.codebooks[0] = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        quantizer.ema_sum.copy_(quantizer.codebooks)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # codes 0, 0, 1
    out = quantizer(z)
    assert out.indices.reshape(-1).tolist() == [0, 0, 1]
    count = 0.9 * torch.ones(3) + 0.1 * torch.tensor([2.0, 1.0, 0.0])
    total_sum = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + 0.1 * torch.tensor(
        [[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]]
    )
    n = count.sum()
    smoothed = (count + 1e-5) / (n + 3 * 1e-5) * n
    torch.testing.assert_close(quantizer.ema_count[0], count)
    torch.testing.assert_close(quantizer.codebooks[0], total_sum / smoothed[:, None])


def _mostly_dead_quantizer(restart_threshold: float) -> ResidualVQ:
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=64, dim=8, depth=1, restart_threshold=restart_threshold, usage_window=10)
    with torch.no_grad():
        quantizer.codebooks[0, 6:] += 100.0  # 58 of 64 codes far from the data: never assigned
        quantizer.ema_sum.copy_(quantizer.codebooks * quantizer.ema_count.unsqueeze(-1))
    return quantizer


def test_dead_codes_are_restarted_to_full_utilisation():
    quantizer = _mostly_dead_quantizer(restart_threshold=1.0)
    gen = torch.Generator().manual_seed(0)
    first_batch = torch.randn(256, 8, generator=gen)
    out = quantizer(first_batch)
    assert out.stats["restarts"].item() >= 58
    # Restarted codes are vectors of the current batch.
    restarted = quantizer.codebooks[0, 6:]
    assert (restarted[:, None, :] == first_batch[None, :, :]).all(dim=-1).any(dim=-1).all()
    for _ in range(200):
        out = quantizer(torch.randn(256, 8, generator=gen))
    assert out.stats["utilisation"].item() > 0.9
    assert out.stats["restarts_total"].item() >= 58

    without_restart = _mostly_dead_quantizer(restart_threshold=0.0)
    for _ in range(30):
        out = without_restart(torch.randn(256, 8, generator=gen))
    assert out.stats["restarts_total"].item() == 0
    assert out.stats["utilisation"].item() < 0.2


@pytest.mark.parametrize("shared_codebook", [True, False])
def test_restarts_draw_distinct_vectors(shared_codebook):
    # 58 dead codes per codebook restarted from 256 candidates: draws with replacement would collide
    # (birthday bound: P(no repeat) ~ 0.2%); without replacement every restarted code is a different vector.
    torch.manual_seed(0)
    quantizer = ResidualVQ(num_codes=64, dim=8, depth=2, restart_threshold=1.0, shared_codebook=shared_codebook)
    with torch.no_grad():
        quantizer.codebooks[:, 6:] += 100.0
        quantizer.ema_sum.copy_(quantizer.codebooks * quantizer.ema_count.unsqueeze(-1))
    out = quantizer(torch.randn(128, 8, generator=torch.Generator().manual_seed(1)))
    assert out.stats["restarts"].item() >= 58 * quantizer.num_codebooks
    for group in range(quantizer.num_codebooks):
        restarted = quantizer.codebooks[group, 6:]
        assert torch.unique(restarted, dim=0).shape[0] == restarted.shape[0]


def test_draw_distinct_spreads_draws_when_candidates_are_few():
    torch.manual_seed(0)
    picks = draw_distinct(10, 16)
    assert picks.unique().numel() == 10 and picks.min() >= 0 and picks.max() < 16
    counts = torch.bincount(draw_distinct(58, 8), minlength=8)
    assert counts.sum() == 58 and counts.max() - counts.min() <= 1
    assert draw_distinct(0, 8).numel() == 0


def test_residual_vq_keeps_float32_state_when_cast():
    quantizer = ResidualVQ(num_codes=16, dim=4, depth=2).bfloat16()
    assert quantizer.codebooks.dtype == torch.float32 and quantizer.ema_sum.dtype == torch.float32
    z = torch.randn(8, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.quantized.dtype == torch.bfloat16
    assert F.mse_loss(out.quantized.float(), z.float()) < z.float().pow(2).mean()


def test_simvq_inference_codebook_cache_tracks_weight_updates():
    torch.manual_seed(0)
    q = SimVQ(num_codes=32, dim=8)
    with torch.no_grad():
        first = q.codebook
        assert q.codebook is first  # cached while nothing changed
        q.codebook_proj.weight.add_(0.5)  # in-place update bumps the tensor version
        updated = q.codebook
    assert not torch.equal(first, updated)
    expected = torch.nn.functional.linear(q.frozen_codebook, q.codebook_proj.weight, q.codebook_proj.bias)
    torch.testing.assert_close(updated, expected.detach())
    assert q.codebook.requires_grad  # with autograd on, W(C) is recomputed and differentiable
