"""Text-to-image decoding speed of `unimm.llm.generation.generate_images`.

    python benchmarks/generation.py                          # CPU-sized Qwen2 shape, N = 64 and 256
    python benchmarks/generation.py --hidden 1536 --layers 28 --device cuda --dtype bfloat16

Reports, in one process on the same model and prompts:
- KV-cached decoding vs recomputing the whole prefix at every position (`use_cache=False`), at each N
  (target >= 5x at N = 256);
- guided (`[cond; uncond]` batched, one forward per step) vs unguided decoding with the cache (target <= 1.3x).
Each figure is the median of `--repeats` runs; runs of the compared variants are interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.llm.generation import generate_images
from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config

PROMPTS = ["a red circle on the left", "a green square at the top right", "a blue triangle in the centre",
           "a yellow circle", "a white square", "a red triangle on the left", "a green circle", "a blue square"]


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size.")
    parser.add_argument("--layers", type=int, default=4, help="LLM decoder layers.")
    parser.add_argument("--heads", type=int, default=4, help="LLM attention heads.")
    parser.add_argument("--vocab", type=int, default=32000, help="LLM vocabulary rows.")
    parser.add_argument("--num-codes", type=int, default=16384, help="Codes of the single (VQRAE-like) group.")
    parser.add_argument("--depth", type=int, default=1, help="Residual depth of the group.")
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 256], help="Image positions N.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per batch.")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    return parser.parse_args(argv)


def _median_time(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_qwen_style_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    config = tiny_llm_config("qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=args.heads, num_kv_heads=args.heads, intermediate_size=4 * args.hidden)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    spec = {"semantic": (args.num_codes, args.depth)}
    model = UniMMForCausalLM.from_llm(llm, spec)
    extend_tokenizer_and_model(tokenizer, model, spec)
    model.to(device).eval()
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"layers={args.layers} vocab={args.vocab} codes={args.num_codes}x{args.depth} prompts={len(prompts)} "
          f"cfg_scale={args.cfg_scale}")
    print("| N | cached (s) | recompute (s) | recompute / cached (target >= 5x at 256) | unguided (s) | "
          "guided / unguided (target <= 1.3x) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.positions:
        def run(use_cache: bool, cfg: float | None, n: int = n) -> None:
            generate_images(model, tokenizer, prompts, num_positions=n, cfg_scale=cfg, seed=0, use_cache=use_cache)

        run(True, args.cfg_scale)  # warm-up
        cached, recompute, unguided = [], [], []
        for _ in range(args.repeats):  # interleaved
            cached += _median_time(lambda: run(True, args.cfg_scale), device, 1)
            unguided += _median_time(lambda: run(True, None), device, 1)
            recompute += _median_time(lambda: run(False, args.cfg_scale), device, 1)
        c, r, u = statistics.median(cached), statistics.median(recompute), statistics.median(unguided)
        print(f"| {n} | {c:.3f} | {r:.3f} | {r / c:.1f}x | {u:.3f} | {c / u:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
