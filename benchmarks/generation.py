"""Text-to-image decoding speed of `unimm.llm.generation.generate_images`.

    python benchmarks/generation.py                          # cache / guidance table, CPU-sized Qwen2, N = 64, 256
    python benchmarks/generation.py --variants hf eager static compile jacobi --positions 64 256 729 --batch 1 8
    python benchmarks/generation.py --variants eager jacobi --trained --positions 256 --batch 1 8
    python benchmarks/generation.py --hidden 1536 --layers 28 --device cuda --dtype bfloat16 --variants ...

Without `--variants` it reports, in one process on the same model and prompts:
- KV-cached decoding vs recomputing the whole prefix at every position (`use_cache=False`), at each N
  (target >= 5x at N = 256);
- guided (`[cond; uncond]` batched, one forward per step) vs unguided decoding with the cache (target <= 1.3x).

With `--variants`, greedy guided decoding of the flat (VQRAE) layout, same model, prompts and N for every variant:
- `hf`: (a) the Hugging Face path Emu3 uses: `model.generate` with transformers'
  `UnbatchedClassifierFreeGuidanceLogitsProcessor` (the unconditional prefix runs as a second, unbatched forward
  with its own cache) and a processor that masks the non-code tokens (Emu3 uses a per-row
  `PrefixConstrainedLogitsProcessor` there, which is slower);
- `eager`: (b) `generate_images` as it was (`decode="eager"`);
- `static`, `compile`, `jacobi`, `jacobi-compile`: the other `decode` modes (`jacobi_window` = `--window`).
Time per image, ratios to (a) and (b), LLM forwards per batch (prefill included) and the share of codes equal to (b)'s. torch.compile's
warm-up (the first call of each shape) is run before timing and reported apart.
`--trained` first trains a smaller flat model (`--train-*`) on synthetic code grids (see `synthetic_grid`), so that
Jacobi decoding's acceptance is measured on a model that has learnt image structure, not on random weights.
Each figure is the median of `--repeats` runs; runs of the compared variants are interleaved.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.llm.generation import DECODE_MODES, generate_images, prefix_batch
from unimm.llm.layout import t2i_prefix_ids
from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config

PROMPTS = ["a red circle on the left", "a green square at the top right", "a blue triangle in the centre",
           "a yellow circle", "a white square", "a red triangle on the left", "a green circle", "a blue square"]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "diamond"]
PLACES = ["top left", "top right", "bottom left", "bottom right"]
VARIANTS = ("hf",) + DECODE_MODES


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size.")
    parser.add_argument("--layers", type=int, default=4, help="LLM decoder layers.")
    parser.add_argument("--heads", type=int, default=4, help="LLM attention heads.")
    parser.add_argument("--vocab", type=int, default=32000, help="LLM vocabulary rows.")
    parser.add_argument("--num-codes", type=int, default=16384, help="Codes of the single (VQRAE-like) group.")
    parser.add_argument("--depth", type=int, default=1, help="Residual depth of the group.")
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 256], help="Image positions N.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per batch (cache / guidance table).")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="Compare these decode variants (flat layout, greedy) instead of the cache table.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="Images per batch (--variants).")
    parser.add_argument("--window", type=int, default=16, help="Jacobi window (positions per forward).")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0],
                        help="--variants: 0 = greedy (codes comparable across variants); > 0 samples (`hf` is "
                             "run greedily only).")
    parser.add_argument("--trained", action="store_true", help="Train a flat model on synthetic grids first.")
    parser.add_argument("--train-hidden", type=int, default=128)
    parser.add_argument("--train-layers", type=int, default=4)
    parser.add_argument("--train-codes", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-batch", type=int, default=16)
    return parser.parse_args(argv)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _median_time(fn, device: torch.device, repeats: int) -> list[float]:
    return [_timed(fn, device) for _ in range(repeats)]


def build_model(tokenizer, args: argparse.Namespace, vocab: int, hidden: int, layers: int, num_codes: int,
                flat: bool, device: torch.device, dtype: torch.dtype) -> UniMMForCausalLM:
    config = tiny_llm_config("qwen2", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                             num_heads=args.heads, num_kv_heads=args.heads, intermediate_size=4 * hidden,
                             max_position_embeddings=4096)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    spec = {"semantic": (num_codes, args.depth)}
    model = UniMMForCausalLM.from_llm(llm, spec, flat_codes=flat)
    extend_tokenizer_and_model(tokenizer, model, spec, flat_codes=flat)
    return model.to(device).eval()


# -- (a): the Hugging Face path ------------------------------------------------------------------------------------
class CodeTokensOnly(LogitsProcessor):
    """Mask every token outside the flat layout's code range (the guided scores stay as they are inside it)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.start : self.stop] = scores[:, self.start : self.stop]
        return masked


def hf_generate(model: UniMMForCausalLM, tokenizer, prompts: list[str], num_positions: int,
                cfg_scale: float) -> torch.Tensor:
    """Greedy codes `[B, N]` through `model.generate` + `UnbatchedClassifierFreeGuidanceLogitsProcessor`."""
    layout = model.config.layout
    device = next(model.parameters()).device
    cond_ids, cond_mask = prefix_batch(tokenizer, layout, prompts, None, None, device)
    uncond = torch.tensor([t2i_prefix_ids(tokenizer, layout, None)] * len(prompts), device=device)
    start, stop = layout.code_token_range
    processors = LogitsProcessorList([
        UnbatchedClassifierFreeGuidanceLogitsProcessor(cfg_scale, model, unconditional_ids=uncond,
                                                       unconditional_attention_mask=torch.ones_like(uncond)),
        CodeTokensOnly(start, stop),
    ])
    with torch.no_grad():
        out = model.generate(input_ids=cond_ids, attention_mask=cond_mask, max_new_tokens=num_positions,
                             min_new_tokens=num_positions, do_sample=False, logits_processor=processors,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None, use_cache=True)
    return layout.token_to_code(out[:, cond_ids.shape[1]:])


# -- a trained stand-in: synthetic code grids ------------------------------------------------------------------
def synthetic_grid(colour: int, shape: int, place: int, side: int, num_codes: int) -> torch.Tensor:
    """Codes `[side * side]` of one image: background code 0; a shape (square, circle, diamond) of half the side in a
    quadrant, whose inner cells hold one code per (colour, shape) and whose border cells one code per (colour,
    shape, side of the border), as a patch tokenizer gives for flat regions and edges."""
    half = side // 2
    top, left = (place // 2) * half, (place % 2) * half
    centre, radius = (half - 1) / 2, half / 2
    grid = torch.zeros(side, side, dtype=torch.long)
    kind = colour * len(SHAPES) + shape
    for y in range(half):
        for x in range(half):
            dy, dx = y - centre, x - centre
            inside = {0: True, 1: dy * dy + dx * dx <= radius * radius, 2: abs(dy) + abs(dx) <= radius}[shape]
            if not inside:
                continue
            border = (y in (0, half - 1) or x in (0, half - 1)) if shape == 0 else not (
                {1: (abs(dy) + 1) ** 2 + dx * dx <= radius * radius and dy * dy + (abs(dx) + 1) ** 2 <= radius * radius,
                 2: abs(dy) + abs(dx) + 1 <= radius}[shape])
            code = 1 + kind if not border else 1 + 12 + kind * 4 + (2 * (dy > 0) + (dx > 0))
            grid[top + y, left + x] = code % num_codes
    return grid.flatten()


def train_stand_in(model: UniMMForCausalLM, tokenizer, num_positions: int, steps: int, batch: int,
                   seed: int = 0) -> tuple[list[str], float]:
    """Train `model` on text-to-image samples of synthetic grids (10% with the unconditional prefix, for guidance);
    returns the prompts and the last loss."""
    layout = model.config.layout
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise SystemExit(f"--trained needs a square number of positions, got {num_positions}")
    samples = [(f"a {c} {s} at the {p}", synthetic_grid(ci, si, pi, side, layout.num_flat_codes))
               for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) for pi, p in enumerate(PLACES)]
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows, labels = [], []
        for prompt, grid in rng.sample(samples, batch):
            prefix = t2i_prefix_ids(tokenizer, layout, None if rng.random() < 0.1 else prompt)
            image = layout.code_to_token(grid).tolist() + [layout.eoi_token_id]
            rows.append(prefix + image)
            labels.append([-100] * len(prefix) + image)
        length = max(map(len, rows))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=device)
        label_ids = torch.tensor([r + [-100] * (length - len(r)) for r in labels], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return [prompt for prompt, _ in samples], float(loss)


# -- the tables --------------------------------------------------------------------------------------------------
def cache_table(model, tokenizer, args, device) -> None:
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
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


def variants_table(model, tokenizer, args, device, prompt_pool: list[str]) -> None:
    for temperature in args.temperature:
        variants = [v for v in args.variants if v != "hf" or temperature <= 0]
        print(f"\ntemperature {temperature} ({'greedy' if temperature <= 0 else 'sampled, seed 0'})")
        _variants_at(model, tokenizer, args, device, prompt_pool, variants, temperature)


def _variants_at(model, tokenizer, args, device, prompt_pool: list[str], variants: list[str],
                 temperature: float) -> None:
    print("| N | batch | variant | s / image | vs (a) hf | vs (b) eager | LLM forwards per batch | positions / forward "
          "| codes equal to (b) | warm-up (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.positions:
        for batch in args.batch:
            prompts = (prompt_pool * (batch // len(prompt_pool) + 1))[:batch]
            outputs: dict[str, torch.Tensor] = {}
            forwards: dict[str, int] = {}

            def run(variant: str, n: int = n, prompts: list[str] = prompts, outputs: dict = outputs,
                    forwards: dict = forwards) -> None:
                if variant == "hf":
                    outputs[variant] = hf_generate(model, tokenizer, prompts, n, args.cfg_scale)
                    forwards[variant] = 2 * n  # one conditional and one unconditional forward per position
                    return
                stats: dict = {}
                codes = generate_images(model, tokenizer, prompts, num_positions=n, cfg_scale=args.cfg_scale,
                                        temperature=temperature, seed=0, decode=variant,
                                        jacobi_window=args.window, stats=stats)
                outputs[variant] = codes["semantic"][..., 0]
                forwards[variant] = stats["llm_forwards"]

            warmup = {v: _timed(lambda v=v: run(v), device) for v in variants}
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.repeats):  # interleaved
                for v in variants:
                    times[v].append(_timed(lambda v=v: run(v), device))
            per_image = {v: statistics.median(t) / batch for v, t in times.items()}
            for v in variants:
                vs_a = f"{per_image['hf'] / per_image[v]:.2f}x" if "hf" in per_image else "-"
                vs_b = f"{per_image['eager'] / per_image[v]:.2f}x" if "eager" in per_image else "-"
                same = (f"{(outputs[v] == outputs['eager']).float().mean():.3f}" if "eager" in outputs else "-")
                print(f"| {n} | {batch} | {v} | {per_image[v]:.3f} | {vs_a} | {vs_b} | {forwards[v]} | "
                      f"{n / forwards[v]:.2f} | {same} | {warmup[v]:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_qwen_style_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    flat = args.variants is not None
    prompt_pool = PROMPTS
    if args.trained:
        model = build_model(tokenizer, args, len(tokenizer), args.train_hidden, args.train_layers, args.train_codes,
                            True, device, dtype)
        start = time.perf_counter()
        prompt_pool, loss = train_stand_in(model, tokenizer, max(args.positions), args.train_steps, args.train_batch)
        shape = f"hidden={args.train_hidden} layers={args.train_layers} vocab={len(tokenizer)} " \
                f"codes={args.train_codes} (trained {args.train_steps} steps x {args.train_batch}, " \
                f"final loss {loss:.3f}, {time.perf_counter() - start:.0f} s)"
        random.Random(1).shuffle(prompt_pool)
    else:
        model = build_model(tokenizer, args, args.vocab, args.hidden, args.layers, args.num_codes, flat, device, dtype)
        shape = f"hidden={args.hidden} layers={args.layers} vocab={args.vocab} codes={args.num_codes}x{args.depth}"
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} {shape} "
          f"cfg_scale={args.cfg_scale} torch={torch.__version__}", flush=True)
    if args.variants:
        variants_table(model, tokenizer, args, device, prompt_pool)
    else:
        cache_table(model, tokenizer, args, device)


if __name__ == "__main__":
    main()
