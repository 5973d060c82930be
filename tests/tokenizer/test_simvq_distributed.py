"""SimVQ under torch.distributed: two gloo processes count codebook usage over the global batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimm.tokenizer.quantizers import SimVQ

NUM_CODES, DIM = 32, 8


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same codebook on every rank
        quantizer = SimVQ(NUM_CODES, DIM)
        with torch.no_grad():
            codes = quantizer.codebook
        # Each rank's inputs are exactly the codes of its half of the codebook: half the codes per rank, all globally.
        half = NUM_CODES // world_size
        inputs = codes[rank * half : (rank + 1) * half]
        stats = quantizer.train()(inputs).stats
        eval_stats = quantizer.eval()(inputs).stats
        torch.save(
            {"train": {k: v.clone() for k, v in stats.items()}, "eval": {k: v.clone() for k, v in eval_stats.items()}},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_simvq_utilisation_is_counted_over_all_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        # Training statistics are global: every code is used by one rank or the other.
        assert rank["train"]["utilisation"].item() == 1.0
        assert rank["train"]["batch_utilisation"].item() == 1.0
        torch.testing.assert_close(rank["train"]["perplexity"], torch.tensor(float(NUM_CODES)))
        # Evaluation (which may run on one rank only) stays local: this rank's half.
        assert rank["eval"]["batch_utilisation"].item() == 0.5
