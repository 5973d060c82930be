"""Collectives on the backend's device: under NCCL, CPU tensors are reduced on the current CUDA device and the
result comes back in place, so metric code that keeps its counts on the CPU works on GPUs. A recording fake backend
stands in for NCCL on CPU-only machines; two gloo ranks check the tokenizer evaluation end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unimm.utils import distributed as d

WORLD = 2


class FakeProcessGroup:
    """Records every collective and the device of its tensor; like NCCL it refuses tensors that are not on CUDA.
    Tensors count as "on CUDA" when they came from the patched transfer (this machine has no GPU to move them to).
    all_reduce multiplies by the world size: the sum over ranks that hold the same values."""

    ReduceOp = dist.ReduceOp

    def __init__(self, backend: str, on_cuda: set[int]):
        self.backend = backend
        self.on_cuda = on_cuda
        self.calls: list[tuple[str, str]] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_backend(self) -> str:
        return self.backend

    def get_world_size(self) -> int:
        return WORLD

    def get_rank(self) -> int:
        return 0

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        device = "cuda" if id(tensor) in self.on_cuda else tensor.device.type
        self.calls.append((name, device))
        if self.backend == "nccl" and device != "cuda":
            raise RuntimeError("No backend type associated with device type cpu")

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self._check("all_reduce", tensor)
        tensor.mul_(WORLD)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._check("broadcast", tensor)

    def barrier(self) -> None:
        self.calls.append(("barrier", "-"))


@pytest.fixture
def fake_nccl(monkeypatch):
    moved: set[int] = set()
    requested: list[torch.device] = []

    def transfer(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        requested.append(device)
        copy = tensor.clone()
        moved.add(id(copy))
        return copy

    group = FakeProcessGroup("nccl", moved)
    monkeypatch.setattr(d, "dist", group)
    monkeypatch.setattr(d, "_transfer", transfer)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return group, requested


def test_collectives_reduce_cpu_tensors_on_the_current_cuda_device(fake_nccl):
    group, requested = fake_nccl
    counts = torch.arange(4, dtype=torch.float64)
    assert d.all_reduce_sum(counts) is counts  # in place, on the caller's device
    assert counts.tolist() == [0.0, 2.0, 4.0, 6.0] and counts.device.type == "cpu"
    mean = torch.full((3,), 5.0)
    d.all_reduce_mean(mean)
    assert mean.tolist() == [5.0, 5.0, 5.0]
    flags = torch.tensor([1, 0], dtype=torch.uint8)
    assert d.broadcast(flags).tolist() == [1, 0]
    assert group.calls == [("all_reduce", "cuda"), ("all_reduce", "cuda"), ("broadcast", "cuda")]
    assert requested == [torch.device("cuda", 1)] * 3


def test_gloo_and_mixed_backends_take_tensors_where_they_are(monkeypatch):
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):
        group = FakeProcessGroup(backend, set())
        monkeypatch.setattr(d, "dist", group)
        monkeypatch.setattr(d, "_transfer", lambda tensor, device, b=backend: pytest.fail(f"moved under {b}"))
        assert d.all_reduce_sum(torch.ones(2)).tolist() == [2.0, 2.0]
        assert group.calls == [("all_reduce", "cpu")]
    group = FakeProcessGroup("nccl", set())
    monkeypatch.setattr(d, "dist", group)
    meta = torch.empty(2, device="meta")  # already on the backend's device type: nothing to move
    monkeypatch.setattr(d, "_SINGLE_DEVICE_BACKENDS", {"nccl": "meta"})
    assert d.collective_device(meta) == meta.device


def test_codebook_usage_and_tokenizer_evaluation_reduce_under_nccl(fake_nccl):
    """The callers the issue found (`CodebookUsage.compute`, `evaluate_tokenizer`) run under the NCCL fake."""
    from unimm.tokenizer import build_tokenizer
    from unimm.tokenizer.metrics import CodebookUsage, evaluate_tokenizer
    from unimm.tokenizer.types import CodebookGroupSpec

    group, requested = fake_nccl
    usage = CodebookUsage({"semantic": CodebookGroupSpec(num_codes=4, depth=1, code_dim=2)})
    usage.update({"semantic": torch.tensor([[[0], [1], [1]]])})
    stats = usage.compute()["semantic"]
    assert stats["num_tokens"] == 3 * WORLD and stats["utilisation"] == 0.5
    torch.manual_seed(0)
    model = build_tokenizer("vqrae-tiny")
    size = model.config.image_size
    results = evaluate_tokenizer(model, [{"pixel_values": torch.randn(2, 3, size, size), "ids": ["a", "b"]}])
    assert results["num_images"] == 2 * WORLD
    assert group.calls and all(device == "cuda" for _, device in group.calls)
    assert len(requested) == len(group.calls)


def _evaluate_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from unimm.tokenizer import build_tokenizer
    from unimm.tokenizer.metrics import evaluate_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = build_tokenizer("vqrae-tiny")
        images = torch.load(Path(out_dir) / "images.pt", weights_only=True)
        mine = [{"pixel_values": images[i : i + 1], "ids": [str(i)]} for i in range(rank, len(images), world_size)]
        torch.save(evaluate_tokenizer(model, mine), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tokenizer_evaluation_under_two_gloo_ranks_equals_one_process(tmp_path):
    from unimm.tokenizer import build_tokenizer
    from unimm.tokenizer.metrics import evaluate_tokenizer

    torch.manual_seed(0)
    model = build_tokenizer("vqrae-tiny")
    size = model.config.image_size
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    mp.spawn(_evaluate_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = evaluate_tokenizer(model, [{"pixel_values": images[i : i + 1], "ids": [str(i)]} for i in range(5)])
    for result in ranks:
        assert result["num_images"] == 5
        assert result["psnr"] == pytest.approx(single["psnr"], rel=1e-6)
        assert result["ssim"] == pytest.approx(single["ssim"], rel=1e-6)
        assert result["codebooks"]["semantic"]["num_tokens"] == single["codebooks"]["semantic"]["num_tokens"]
        assert result["semantic/utilisation"] == single["semantic/utilisation"]
        assert result["semantic/perplexity"] == pytest.approx(single["semantic/perplexity"], rel=1e-9)


def _nccl_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        counts = torch.full((3,), float(rank + 1), dtype=torch.float64)  # on the CPU, as metric counts are
        d.all_reduce_sum(counts)
        flag = torch.tensor([rank], dtype=torch.uint8)
        d.broadcast(flag)
        torch.save({"counts": counts, "flag": flag}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multi_gpu
def test_cpu_tensors_reduce_under_real_nccl(tmp_path):
    mp.spawn(_nccl_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["counts"].device.type == "cpu" and out["counts"].tolist() == [3.0, 3.0, 3.0]
        assert out["flag"].tolist() == [0]


def _run_main_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from unimm.cli import run_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    def main(argv: list[str]) -> int:
        total = int(d.all_reduce_sum(torch.tensor([rank]))[0])
        if rank == 1:
            time.sleep(0.5)  # one rank finishes late: the other must wait for it before leaving
        return total

    result = run_main(main, [], prog="worker")
    Path(out_dir, f"rank{rank}.txt").write_text(f"{result} {dist.is_initialized()} {time.monotonic()}")


def test_run_main_leaves_the_process_group_together(tmp_path):
    """A finished program shuts the process group down on every rank, after a barrier."""
    mp.spawn(_run_main_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    rows = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert all(row[0] == str(sum(range(WORLD))) and row[1] == "False" for row in rows)
    finish = [float(row[2]) for row in rows]
    assert abs(finish[0] - finish[1]) < 0.4  # rank 0 waited for the late rank 1 (0.5 s) in the barrier
