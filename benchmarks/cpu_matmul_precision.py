"""CPU training step under `--cpu_matmul_precision` (unimm.utils.runtime): forward + backward + AdamW of a UniMM
model shaped like the quickstart's (tiny Qwen2: hidden 256, 4 layers; DualToken codes pixel 2 x 256 + semantic
1 x 256; one 128-wide depth-head layer) on a text-to-image batch, with float32 products exact ("ieee") or from
bfloat16 inputs ("bf16"), and SDPA or eager attention. Every variant is timed in this process, interleaved, and
reported as a ratio to exact float32 with SDPA (the median of `--repeats` steps).

    OMP_NUM_THREADS=1 python benchmarks/cpu_matmul_precision.py --repeats 20

bf16 products need AMX or AVX512-BF16 (without them the trainer keeps ieee; here the variant is skipped).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config
from unimm.utils.hf_compat import cpu_has_native_bf16
from unimm.utils.runtime import cpu_matmul_precision

SPEC = {"pixel": (256, 2), "semantic": (256, 1)}
VARIANTS = (("ieee", "sdpa"), ("ieee", "eager"), ("bf16", "sdpa"), ("bf16", "eager"))


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="Rows per step (the quickstart's per-rank batch).")
    parser.add_argument("--text", type=int, default=10, help="Prompt tokens per row.")
    parser.add_argument("--image-positions", type=int, default=64, help="Visual positions per row (8 x 8).")
    parser.add_argument("--repeats", type=int, default=20, help="Timed steps per variant (median reported).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")
    return parser.parse_args(argv)


def _model(tokenizer_dir: str, attn: str) -> tuple[UniMMForCausalLM, object]:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llm_config("qwen2", vocab_size=300, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                             intermediate_size=512)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = UniMMForCausalLM.from_llm(llm, SPEC, depth_head_hidden_size=128, depth_head_layers=1,
                                      depth_head_intermediate_size=512)
    layout = extend_tokenizer_and_model(tokenizer, model, SPEC)
    return model.train(), layout


def _batch(layout, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    n, text = args.image_positions, args.text
    text_ids = torch.randint(0, layout.original_vocab_size, (args.batch, text), generator=gen)
    span = torch.tensor([layout.boi_token_id] + [layout.image_token_id] * n + [layout.eoi_token_id])
    input_ids = torch.cat([text_ids, span.expand(args.batch, -1)], dim=1)
    codes = {}
    for name, (num_codes, depth) in SPEC.items():
        c = torch.full((args.batch, input_ids.shape[1], depth), -1)
        c[:, text + 1 : text + 1 + n] = torch.randint(0, num_codes, (args.batch, n, depth), generator=gen)
        codes[name] = c
    return dict(input_ids=input_ids, labels=input_ids, visual_codes=codes)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if v[0] == "ieee" or cpu_has_native_bf16()]
    with tempfile.TemporaryDirectory() as tmp:
        build_qwen_style_tokenizer(tmp)
        built = {attn: _model(tmp, attn) for attn in ("sdpa", "eager")}
    batch = _batch(built["sdpa"][1], args)
    optimizers = {attn: torch.optim.AdamW(model.parameters(), lr=1e-4) for attn, (model, _) in built.items()}

    def step(precision: str, attn: str) -> float:
        model, optimizer = built[attn][0], optimizers[attn]
        with cpu_matmul_precision(precision):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
            return time.perf_counter() - start

    for variant in variants:  # warm-up
        step(*variant)
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(step(*variant))
    base = statistics.median(times[VARIANTS[0]])
    print(f"threads={torch.get_num_threads()} batch={args.batch}x{batch['input_ids'].shape[1]} tokens "
          f"({args.image_positions} image positions), repeats={args.repeats}; native bf16: {cpu_has_native_bf16()}")
    print("| float32 products | attention | step (s, median) | time vs ieee + sdpa |")
    print("| --- | --- | --- | --- |")
    for (precision, attn), values in times.items():
        median = statistics.median(values)
        print(f"| {precision} | {attn} | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
