"""Nearest-code search benchmark: chunked search vs one bare `z @ C.T` matmul vs naive `torch.cdist` argmin.

    python benchmarks/quantizer.py                       # K=16384, d=1536, N=65536 and 262144 (GPU sizes)
    python benchmarks/quantizer.py --n 2048 8192         # smaller N for CPU

Reports, per N, the best-of-`--repeats` wall time of each method (runs interleaved), the ratio chunked / bare matmul (target
<= 1.5x), and the peak extra memory of each: on CUDA `torch.cuda.max_memory_allocated` above the inputs; on
CPU the process's resident high-water mark (Linux VmHWM, reset just before each call). On CPU the script
re-executes itself with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc maps and unmaps every large block and
resident memory follows the live tensors. A method whose estimated memory exceeds `--max-gib` is not run;
its memory is then reported as an estimate from the shapes (marked "est.").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from unimm.tokenizer.quantizers.search import nearest_code, plan_search

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
GIB = 1024**3
MIB = 1024**2


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[65536, 262144], help="Numbers of query vectors N.")
    parser.add_argument("--num-codes", type=int, default=16384, help="Codebook size K.")
    parser.add_argument("--dim", type=int, default=1536, help="Code dimension d.")
    parser.add_argument("--budget-mib", type=int, default=256, help="Memory budget of the chunked search (MiB).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per method (best is reported).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="Skip (estimate only) methods needing more than this; default 4 on CPU, 80%% of GPU.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's.")
    parser.add_argument("--no-naive", action="store_true", help="Do not run the naive cdist baseline.")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_extra_bytes(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak memory of one call of `fn` above what was live before it (also serves as the warm-up run)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        base = _read_status_kib("VmRSS")
        result = fn()
        peak = (_read_status_kib("VmHWM") - base) * 1024
    del result
    return peak


def _best_times(fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall time of each function; runs are interleaved so that background load hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            result = fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
            del result
    return best


def _fmt_bytes(num: float) -> str:
    return f"{num / GIB:.2f} GiB" if num >= GIB else f"{num / MIB:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and sys.platform.startswith("linux") and os.environ.get(_MMAP_ENV) != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _MMAP_ENV: "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_gib is None:
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 5 * GIB
        args.max_gib = 0.8 * total / GIB
    budget = args.budget_mib * MIB
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# device: {name}; torch {torch.__version__}; K={args.num_codes} d={args.dim} float32; "
        f"budget {args.budget_mib} MiB; best of {args.repeats}"
    )
    print(
        "| N | bare z @ C.T | chunked search | ratio | naive cdist+argmin | chunks x rows | peak: bare | "
        "peak: chunked (plan) | peak: naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=device).manual_seed(0)
    codebook = torch.randn(args.num_codes, args.dim, generator=gen, device=device)
    for n in args.n:
        z = torch.randn(n, args.dim, generator=gen, device=device)
        out_bytes = n * args.num_codes * 4
        plan = plan_search(n, args.num_codes, args.dim, budget)
        limit = args.max_gib * GIB

        # torch.cdist (mm path) builds [N, d+2] and [K, d+2] padded copies and the [N, K] result.
        naive_bytes = out_bytes + (n + args.num_codes) * (args.dim + 2) * 4
        fns: dict[str, Callable[[], torch.Tensor]] = {}
        estimates: dict[str, int] = {}
        for key, fn, needed in (
            ("bare", lambda z=z: z @ codebook.T, out_bytes),
            ("chunked", lambda z=z: nearest_code(z, codebook, budget), plan.peak_extra_bytes),
            ("naive", lambda z=z: torch.cdist(z, codebook).argmin(dim=1), naive_bytes),
        ):
            if needed <= limit and not (key == "naive" and args.no_naive):
                fns[key] = fn
            else:
                estimates[key] = needed
        peaks = {key: _peak_extra_bytes(fn, device) for key, fn in fns.items()}
        times = _best_times(fns, device, args.repeats)
        if "naive" in fns and not torch.equal(fns["naive"](), fns["chunked"]()):
            print(f"WARNING: chunked and naive indices differ at N={n}", flush=True)

        time_cell = {k: f"{times[k] * 1e3:.1f} ms" if k in times else "not run" for k in ("bare", "chunked", "naive")}
        mem_cell = {
            k: _fmt_bytes(peaks[k]) if k in peaks else f"{_fmt_bytes(estimates[k])} est."
            for k in ("bare", "chunked", "naive")
        }
        ratio = f"{times['chunked'] / times['bare']:.2f}x" if "bare" in times and "chunked" in times else "n/a"
        print(
            f"| {n} | {time_cell['bare']} | {time_cell['chunked']} | {ratio} | {time_cell['naive']} | "
            f"{plan.num_chunks} x {plan.rows_per_chunk} | {mem_cell['bare']} | {mem_cell['chunked']} "
            f"({_fmt_bytes(plan.peak_extra_bytes)}) | {mem_cell['naive']} |",
            flush=True,
        )
        del z


if __name__ == "__main__":
    main()
