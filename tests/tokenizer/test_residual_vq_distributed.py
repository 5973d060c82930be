"""ResidualVQ under torch.distributed: two gloo processes on different data keep identical codebooks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimm.tokenizer.quantizers import ResidualVQ

NUM_CODES, DIM, DEPTH, STEPS, BATCH = 64, 8, 2, 12, 128


def _batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    # The ranks see different distributions (different scales), so unsynchronised codebooks would diverge.
    return [torch.randn(BATCH, DIM, generator=gen) * (1.0 + rank) for _ in range(STEPS)]


def _train(quantizer: ResidualVQ, batches: list[torch.Tensor]) -> int:
    restarts = 0
    for batch in batches:
        restarts += int(quantizer(batch).stats["restarts"])
    return restarts


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = _batches(rank)
        torch.manual_seed(0)  # same initial codebook on every rank
        with_restart = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=1.0)
        with torch.no_grad():  # most codes start far from the data, so they die and get restarted
            with_restart.codebooks[:, 8:] += 100.0
            with_restart.ema_sum.copy_(with_restart.codebooks)
        torch.manual_seed(1000 + rank)  # different RNG streams: only rank 0's restart draws may count
        restarts = _train(with_restart, batches)
        torch.manual_seed(0)
        no_restart = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=0.0, shared_codebook=False)
        _train(no_restart, batches)
        # The EMA step depth by depth (DualToken's pixel codebook): one all-reduce and restart round per depth.
        torch.manual_seed(0)
        per_depth = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=1.0, ema_per_depth=True)
        with torch.no_grad():
            per_depth.codebooks[:, 8:] += 100.0
            per_depth.ema_sum.copy_(per_depth.codebooks)
        torch.manual_seed(1000 + rank)
        per_depth_restarts = _train(per_depth, batches)
        torch.manual_seed(0)
        per_depth_plain = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=0.0, ema_per_depth=True)
        _train(per_depth_plain, batches)
        torch.save(
            {
                "restart_state": with_restart.state_dict(),
                "restarts": restarts,
                "no_restart_state": no_restart.state_dict(),
                "per_depth_state": per_depth.state_dict(),
                "per_depth_restarts": per_depth_restarts,
                "per_depth_plain_state": per_depth_plain.state_dict(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # With dead-code restarts: rank 0's restart vectors are broadcast, so codebooks stay bit-identical.
    assert ranks[0]["restarts"] > 0 and ranks[0]["restarts"] == ranks[1]["restarts"]
    for name in ("codebooks", "ema_count", "ema_sum"):
        assert torch.equal(ranks[0]["restart_state"][name], ranks[1]["restart_state"][name]), name

    # Without restarts, all-reduced statistics make two ranks equal one process on the concatenated batches.
    for name in ("codebooks", "ema_count", "ema_sum"):
        assert torch.equal(ranks[0]["no_restart_state"][name], ranks[1]["no_restart_state"][name]), name
    torch.manual_seed(0)
    single = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=0.0, shared_codebook=False)
    _train(single, [torch.cat(pair) for pair in zip(_batches(0), _batches(1))])
    torch.testing.assert_close(ranks[0]["no_restart_state"]["codebooks"], single.codebooks, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["no_restart_state"]["ema_count"], single.ema_count)

    # Control: rank 0's data alone gives a different codebook, so the agreement above is due to synchronisation.
    torch.manual_seed(0)
    alone = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=0.0, shared_codebook=False)
    _train(alone, _batches(0))
    assert not torch.allclose(alone.codebooks, single.codebooks, atol=1e-3)

    # Depth by depth: restarts and statistics stay in step across ranks, and equal one process on both batches.
    assert ranks[0]["per_depth_restarts"] > 0 and ranks[0]["per_depth_restarts"] == ranks[1]["per_depth_restarts"]
    for name in ("codebooks", "ema_count", "ema_sum"):
        assert torch.equal(ranks[0]["per_depth_state"][name], ranks[1]["per_depth_state"][name]), name
    torch.manual_seed(0)
    single_per_depth = ResidualVQ(NUM_CODES, DIM, DEPTH, restart_threshold=0.0, ema_per_depth=True)
    _train(single_per_depth, [torch.cat(pair) for pair in zip(_batches(0), _batches(1))])
    torch.testing.assert_close(ranks[0]["per_depth_plain_state"]["codebooks"], single_per_depth.codebooks,
                               rtol=1e-5, atol=1e-5)
