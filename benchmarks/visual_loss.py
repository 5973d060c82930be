"""Visual-loss benchmark: one depth head's loss, forward + backward, unchunked logits + `F.cross_entropy` ("before")
against the chunked cross-entropy fused with its gradient (`DepthTransformerHead(..., loss_scale=...)`, "after").
`--scope loss` (default) times the classifier + cross-entropy from the depth transformer's output states, the part
the chunking changes; `--scope head` the whole head, whose transformer activations (1.5 GB at batch 2 on a 3-layer,
896-wide head) are the same in both variants.

    python benchmarks/visual_loss.py                        # paper shape: 729 positions x 8 depths x 16384 codes, batch 8
    python benchmarks/visual_loss.py --batch 2 --repeats 2  # what 2 CPU cores shared with other jobs allow

The head is the one UniMM builds for a Qwen2.5-0.5B-width LLM (hidden 896, head width 896, 3 layers). Reports the
best-of-`--repeats` wall time of each variant (runs interleaved) and the peak extra memory of one run above what was
live before it (parameters, inputs): on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident high-water mark
(Linux VmHWM reset just before the run), with the script re-executed under `MALLOC_MMAP_THRESHOLD_=65536` so that
resident memory follows the live tensors. Targets (issue 11): peak memory after / before <= 1/4, time <= 1.1x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from unimm.llm.depth_head import LOSS_CHUNK_BYTES, ClassifierCrossEntropy, DepthTransformerHead
from unimm.tokenizer.types import CodebookGroupSpec

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MIB = 1024**2


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Images per batch (729 visual targets each).")
    parser.add_argument("--positions", type=int, default=729, help="Visual targets per image (27 x 27).")
    parser.add_argument("--depth", type=int, default=8, help="Residual depth D.")
    parser.add_argument("--num-codes", type=int, default=16384, help="Codes K.")
    parser.add_argument("--llm-hidden", type=int, default=896, help="LLM (and head) width.")
    parser.add_argument("--head-layers", type=int, default=3, help="Depth-head layers.")
    parser.add_argument("--scope", choices=("loss", "head"), default="loss", help=(
        "loss: classifier + cross-entropy from the depth transformer's states [M, D, h] (what chunking changes); "
        "head: the whole depth head, whose transformer activations are the same in both variants."))
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per variant (best is reported).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    base = _read_status_kib("VmRSS")
    fn()
    return (_read_status_kib("VmHWM") - base) * 1024


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get(_MMAP_ENV) is None:
        os.environ[_MMAP_ENV] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    group = CodebookGroupSpec(num_codes=args.num_codes, depth=args.depth, code_dim=32)
    head = DepthTransformerHead(group, args.llm_hidden, args.llm_hidden, num_layers=args.head_layers,
                                num_heads=max(1, args.llm_hidden // 64)).to(device)
    num = args.batch * args.positions
    codes = torch.randint(0, args.num_codes, (num, args.depth), device=device)
    if args.scope == "head":
        inputs = torch.randn(num, args.llm_hidden, device=device, requires_grad=True)  # LLM hidden states [M, H]
        params = list(head.parameters())

        def logits_of() -> torch.Tensor:
            return head(inputs, codes)  # [M, D, K]

        def fused() -> torch.Tensor:
            return head(inputs, codes, loss_scale=1.0)[0]
    else:
        inputs = torch.randn(num, args.depth, args.llm_hidden, device=device, requires_grad=True)  # states [M, D, h]
        params = [head.classifier]
        chunk = max(1, LOSS_CHUNK_BYTES // (4 * args.depth * args.num_codes))
        scale = torch.full((args.depth,), 1.0 / args.depth, device=device)

        def logits_of() -> torch.Tensor:
            return torch.einsum("mdh,dkh->mdk", inputs, head.classifier)

        def fused() -> torch.Tensor:
            return ClassifierCrossEntropy.apply(inputs, head.classifier, codes, scale, chunk)[0]

    def reset() -> None:  # gradients of the previous run are freed before a run starts (and before its baseline)
        for param in params:
            param.grad = None
        inputs.grad = None

    def before() -> None:
        logits = logits_of().float()
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape)
        ce.mean(dim=1).sum().backward()

    def after() -> None:
        fused().backward()

    variants = {"after": after, "before": before}
    for fn in variants.values():  # warm-up: one-time allocations (thread pools, BLAS buffers) count for neither
        reset()
        fn()
    peaks = {}
    for name, fn in variants.items():
        reset()
        peaks[name] = _peak_extra_bytes(fn, device)  # includes the gradients the run allocates
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for name, fn in variants.items():
            reset()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    logits_bytes = num * args.depth * args.num_codes * 4
    print(f"scope {args.scope}; device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"M = {args.batch} x "
          f"{args.positions} = {num} targets, D {args.depth}, K {args.num_codes}, width {args.llm_hidden}; "
          f"fp32 logits would be {logits_bytes / MIB:.0f} MiB")
    print("| variant | time (s) | peak extra memory |\n| --- | --- | --- |")
    for name in ("before", "after"):
        print(f"| {name} | {best[name]:.2f} | {peaks[name] / MIB:.0f} MiB |")
    ratios = {"time_ratio": best["after"] / best["before"], "memory_ratio": peaks["after"] / peaks["before"]}
    print(f"after / before: time {ratios['time_ratio']:.2f}x (target <= 1.1), peak memory "
          f"{ratios['memory_ratio']:.3f}x (target <= 0.25)")
    return ratios


if __name__ == "__main__":
    main()
