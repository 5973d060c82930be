"""Training-step overhead of UniMM: forward + backward of `UniMMForCausalLM` on a batch with image positions vs a
plain Hugging Face forward + backward of the same (shared) LLM on the same number of tokens, all supervised.
Target (docs/DESIGN.md §6): <= 1.15x.

    python benchmarks/llm_step.py                                   # CPU-sized Qwen2 shape, both code layouts
    python benchmarks/llm_step.py --hidden 1536 --layers 28 --vocab 151936 --seq 2048 --device cuda --dtype bfloat16

The UniMM side pays for the visual embedding and the depth heads (3 layers over D tokens per visual position);
it saves the LM head at visual positions (logits are computed only where text is supervised). Runs are
interleaved and the median of `--repeats` is reported.
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

SPECS = {
    "vqrae": {"semantic": (16384, 1)},
    "dualtoken": {"pixel": (16384, 4), "semantic": (16384, 4)},
}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size.")
    parser.add_argument("--layers", type=int, default=8, help="LLM decoder layers.")
    parser.add_argument("--heads", type=int, default=4, help="LLM attention heads.")
    parser.add_argument("--vocab", type=int, default=32000, help="LLM vocabulary rows (LM-head width).")
    parser.add_argument("--seq", type=int, default=512, help="Tokens per row.")
    parser.add_argument("--batch", type=int, default=2, help="Rows per batch.")
    parser.add_argument("--image-positions", type=int, default=256, help="Visual positions per row (N).")
    parser.add_argument("--spec", nargs="+", default=list(SPECS), choices=list(SPECS), help="Code layouts to run.")
    parser.add_argument("--head-hidden", type=int, default=None, help="Depth-head width (default: LLM width).")
    parser.add_argument("--head-layers", type=int, default=3, help="Depth-head layers.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per side (median reported).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace, spec_name: str) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = SPECS[spec_name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_qwen_style_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    config = tiny_llm_config("qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=args.heads, num_kv_heads=args.heads, intermediate_size=4 * args.hidden,
                             max_position_embeddings=max(2048, args.seq))
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = UniMMForCausalLM.from_llm(llm, spec, depth_head_hidden_size=args.head_hidden,
                                      depth_head_layers=args.head_layers)
    layout = extend_tokenizer_and_model(tokenizer, model, spec)
    model.to(device).train()

    n, seq = args.image_positions, args.seq
    text = seq - n - 2
    if text < 2:
        raise ValueError(f"--seq {seq} leaves no room for text around {n} image positions")
    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, layout.original_vocab_size, (args.batch, text), generator=gen)
    span = torch.tensor([layout.boi_token_id] + [layout.image_token_id] * n + [layout.eoi_token_id])
    input_ids = torch.cat([text_ids, span.expand(args.batch, -1)], dim=1)
    codes = {}
    for name, (num_codes, depth) in spec.items():
        c = torch.full((args.batch, seq, depth), -1)
        c[:, text + 1 : text + 1 + n] = torch.randint(0, num_codes, (args.batch, n, depth), generator=gen)
        codes[name] = c.to(device)
    unimm_batch = dict(input_ids=input_ids.to(device), labels=input_ids.to(device), visual_codes=codes)
    plain_ids = torch.randint(0, layout.original_vocab_size, (args.batch, seq), generator=gen).to(device)
    plain_batch = dict(input_ids=plain_ids, labels=plain_ids)

    def unimm_step():
        model.zero_grad(set_to_none=True)
        model(**unimm_batch).loss.backward()

    def hf_step():
        llm.zero_grad(set_to_none=True)
        llm(**plain_batch).loss.backward()

    for fn in (unimm_step, hf_step):  # warm-up
        fn()
    unimm_times, hf_times = [], []
    for _ in range(args.repeats):
        unimm_times.append(_time(unimm_step, device))
        hf_times.append(_time(hf_step, device))
    unimm_t, hf_t = statistics.median(unimm_times), statistics.median(hf_times)
    return dict(spec=spec_name, unimm_s=unimm_t, hf_s=hf_t, ratio=unimm_t / hf_t,
                head_params=sum(p.numel() for p in model.depth_heads.parameters()),
                llm_params=sum(p.numel() for p in llm.parameters()))


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} hidden={args.hidden} "
          f"layers={args.layers} vocab={args.vocab} batch={args.batch}x{args.seq} tokens, "
          f"{args.image_positions} image positions/row, head layers={args.head_layers} "
          f"head hidden={args.head_hidden or args.hidden}")
    print("| codes | UniMM step (s) | HF step (s) | ratio (target <= 1.15) | head params / LLM params |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.spec:
        r = run(args, name)
        layout = ", ".join(f"{g} {k}x{d}" for g, (k, d) in SPECS[name].items())
        print(f"| {name} ({layout}) | {r['unimm_s']:.3f} | {r['hf_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['head_params'] / 1e6:.1f}M / {r['llm_params'] / 1e6:.1f}M |", flush=True)


if __name__ == "__main__":
    main()
