"""The measurements a first lent GPU should make, in one run that prints one markdown table (issue 28).

    bash benchmarks/gpu_suite.sh                       # one CUDA GPU: paper shapes, within ~8 minutes on an H100
    bash benchmarks/gpu_suite.sh --device cpu --tiny   # the same code paths at toy sizes (the test suite runs this)

Rows:
- pretraining step (forward, backward, AdamW) of a Qwen2.5-0.5B-shaped UniMM (hidden 896, 24 layers, 14 / 2 heads,
  vocabulary 151936; bf16, SDPA, packed rows of 2048 tokens of text-to-image samples) with the VQRAE layout (flat,
  16384 codes, 256 positions) and the DualToken layout (two groups of 16384 codes x depth 8, 729 positions, depth
  heads): tokens/s and MFU (`unimm.train.llm.mfu`; peak from the GPU table);
- the depth heads' share of the DualToken step: their forward + backward alone over the step's image positions,
  divided by the whole step;
- text-to-image with guidance (greedy, the flat model, N = 256): image tokens/s at batch 1, 16 and 64 for each
  `generate_images` decode mode (torch.compile's warm-up excluded and shown apart; the compiled modes run at
  batch 16 only, to keep the run short);
- visual-tokenizer encode images/s at paper shape (random weights): DualToken (SigLIP so400m/14, 384 px) and VQRAE
  (SigLIP2 so400m/16, 256 px), batch 16.
`--tiny` swaps every shape for a toy one (hidden 64, 2 layers, 64-token rows, N = 16, batches 1 and 2, 32 px tiny
tokenizers) and, on CPU, compiles with the `aot_eager` backend, so the suite checks that every path runs, not what
it measures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model, static_decode
from unimm.llm.generation import DECODE_MODES, generate_images
from unimm.llm.layout import IGNORE_INDEX, t2i_prefix_ids
from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config
from unimm.train.llm.mfu import LLMShape, flops_per_token, mfu, resolve_peak_flops

PAPER = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, row=2048, rows=4,
             head_hidden=896, vqrae=((16384, 1), 256), dualtoken=((16384, 8), 729), t2i_positions=256,
             batches=(1, 16, 64), compile_batches=(16,), encode_batch=16, steps=(2, 5))
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, row=64, rows=2,
            head_hidden=32, vqrae=((64, 1), 16), dualtoken=((32, 2), 16), t2i_positions=16,
            batches=(1, 2), compile_batches=(2,), encode_batch=2, steps=(1, 1))


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="Toy shapes: check the paths, not the figures.")
    parser.add_argument("--parts", nargs="+", default=["pretrain", "t2i", "encode"],
                        choices=["pretrain", "t2i", "encode"])
    parser.add_argument("--compile-backend", default=None, choices=["inductor", "aot_eager"],
                        help="torch.compile backend of the compiled decode modes (default: inductor; aot_eager with "
                             "--tiny on CPU, where inductor's C++ warm-up alone takes minutes).")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak for MFU (default: GPU table / CPU matmul).")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _model(shape: dict, spec: dict, flat: bool, tokenizer_dir: str, device, dtype,
           num_positions: int) -> tuple[UniMMForCausalLM, object]:
    """A random UniMM model of `shape` and its extended tokenizer (fresh from `tokenizer_dir`)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llm_config("qwen2", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                             num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                             intermediate_size=shape["intermediate"], max_position_embeddings=32768)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = UniMMForCausalLM.from_llm(llm, spec, flat_codes=flat, dtype=dtype, num_image_positions=num_positions,
                                      depth_head_hidden_size=shape["head_hidden"])
    extend_tokenizer_and_model(tokenizer, model, spec, flat_codes=flat)
    return model.to(device), tokenizer


def _packed_batch(model: UniMMForCausalLM, tokenizer, shape: dict, num_positions: int, device) -> dict:
    """Rows of `row` tokens packed with text-to-image samples (random codes), position_ids restarting per sample."""
    layout = model.config.layout
    generator = torch.Generator().manual_seed(0)
    rows, labels, positions = [], [], []
    codes = {name: [] for name in model.config.groups}
    for _ in range(shape["rows"]):
        ids, lab, pos = [], [], []
        row_codes = {name: [] for name in model.config.groups}
        while True:
            prefix = t2i_prefix_ids(tokenizer, layout, "a red circle at the top left of a white square")
            sample = prefix + [layout.image_token_id] * num_positions + [layout.eoi_token_id]
            if len(ids) + len(sample) > shape["row"]:
                break
            ids += sample
            lab += [IGNORE_INDEX] * len(prefix) + sample[len(prefix):]
            pos += list(range(len(sample)))
            for name, group in model.config.groups.items():
                drawn = torch.randint(0, group.num_codes, (num_positions, group.depth), generator=generator)
                row_codes[name] += [[-1] * group.depth] * len(prefix) + drawn.tolist() + [[-1] * group.depth]
        if not ids:
            raise SystemExit(f"a {num_positions}-position sample does not fit a {shape['row']}-token row")
        fill = shape["row"] - len(ids)
        rows.append(ids + [tokenizer.pad_token_id] * fill)
        labels.append(lab + [IGNORE_INDEX] * fill)
        positions.append(pos + list(range(fill)))
        for name, group in model.config.groups.items():
            codes[name].append(row_codes[name] + [[-1] * group.depth] * fill)
    return dict(input_ids=torch.tensor(rows, device=device), labels=torch.tensor(labels, device=device),
                position_ids=torch.tensor(positions, device=device),
                visual_codes={n: torch.tensor(c, device=device) for n, c in codes.items()})


def _pretrain_layout(shape: dict, tokenizer_dir: str, device, dtype, peak: float, flat: bool) -> list[tuple[str, str]]:
    layout_name = "VQRAE" if flat else "DualToken"
    warmup, timed = shape["steps"]
    (num_codes, depth), num_positions = shape["vqrae" if flat else "dualtoken"]
    spec = {"semantic": (num_codes, depth)} if flat else {"pixel": (num_codes, depth), "semantic": (num_codes, depth)}
    model, tokenizer = _model(shape, spec, flat, tokenizer_dir, device, dtype, num_positions)
    model.train()
    batch = _packed_batch(model, tokenizer, shape, num_positions, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    step_time = statistics.median(_timed(step, device) for _ in range(timed))
    tokens = batch["input_ids"].numel()
    heads = sum(p.numel() for n, p in model.named_parameters() if n.startswith("depth_heads"))
    per_token = flops_per_token(LLMShape.from_config(model.config), shape["row"], extra_matmul_params=heads)
    out = [(f"pretrain {layout_name}: tokens/s, MFU",
            f"{tokens / step_time:,.0f} tokens/s, MFU {100 * mfu(tokens / step_time, per_token, peak):.1f}% "
            f"({step_time * 1000:.0f} ms / step of {tokens} tokens)")]
    if not flat:
        image = batch["visual_codes"]["pixel"][..., 0] >= 0
        hidden = torch.randn(int(image.sum()), shape["hidden"], device=device, dtype=dtype, requires_grad=True)

        def heads_step() -> None:
            total = sum(head(hidden, batch["visual_codes"][n][image], loss_scale=1.0)[0]
                        for n, head in model.depth_heads.items())
            total.backward()

        heads_step()
        head_time = statistics.median(_timed(heads_step, device) for _ in range(timed))
        out.append(("depth heads' share of the DualToken step",
                    f"{100 * head_time / step_time:.0f}% ({head_time * 1000:.0f} ms forward + backward)"))
    return out


def pretrain_rows(shape: dict, tokenizer_dir: str, device, dtype, peak: float) -> list[tuple[str, str]]:
    rows = []
    for flat in (True, False):
        rows += _pretrain_layout(shape, tokenizer_dir, device, dtype, peak, flat)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def t2i_rows(shape: dict, tokenizer_dir: str, device, dtype) -> list[tuple[str, str]]:
    (num_codes, _), _ = shape["vqrae"]
    n = shape["t2i_positions"]
    model, tokenizer = _model(shape, {"semantic": (num_codes, 1)}, True, tokenizer_dir, device, dtype, n)
    model.eval()
    out = []
    for batch in shape["batches"]:
        prompts = [f"a shape number {i}" for i in range(batch)]
        for mode in DECODE_MODES:
            if "compile" in mode and batch not in shape["compile_batches"]:
                continue

            def run(mode: str = mode, prompts: list[str] = prompts) -> None:
                generate_images(model, tokenizer, prompts, num_positions=n, cfg_scale=3.0, temperature=0.0,
                                decode=mode)

            warmup = _timed(run, device)
            seconds = _timed(run, device)
            note = f", warm-up {warmup:.0f} s" if "compile" in mode else ""
            out.append((f"t2i image tokens/s, N={n}, guided, batch {batch}, {mode}",
                        f"{batch * n / seconds:,.1f}{note}"))
    return out


def encode_rows(shape: dict, tiny: bool, device, dtype) -> list[tuple[str, str]]:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

    from unimm.tokenizer import build_tokenizer

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            presets = [("DualToken tiny (32 px)", build_tokenizer("dualtoken-tiny")),
                       ("VQRAE tiny (32 px)", build_tokenizer("vqrae-tiny"))]
        else:
            SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                 num_attention_heads=16, patch_size=14, image_size=384)
                              ).save_pretrained(Path(tmp) / "siglip")
            Siglip2VisionModel(Siglip2VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                   num_attention_heads=16, patch_size=16, num_patches=256)
                               ).save_pretrained(Path(tmp) / "siglip2")
            presets = [("DualToken so400m/14 384 px", build_tokenizer("dualtoken-siglip-so400m-384",
                                                                        encoder_path=Path(tmp) / "siglip")),
                       ("VQRAE SigLIP2 so400m/16 256 px", build_tokenizer("vqrae-siglip2-so400m-256",
                                                                            encoder_path=Path(tmp) / "siglip2"))]
        for name, tokenizer in presets:
            tokenizer = tokenizer.to(device=device, dtype=dtype).eval()
            size = tokenizer.config.image_size
            pixels = torch.rand(shape["encode_batch"], 3, size, size, device=device, dtype=dtype) * 2 - 1
            tokenizer.encode(pixels)
            seconds = _timed(lambda tokenizer=tokenizer, pixels=pixels: tokenizer.encode(pixels), device)
            out.append((f"visual tokenizer encode, {name}, batch {shape['encode_batch']}",
                        f"{shape['encode_batch'] / seconds:,.1f} images/s"))
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny to check the paths)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.tiny else PAPER
    backend = args.compile_backend or ("aot_eager" if args.tiny and device.type == "cpu" else "inductor")
    static_decode.COMPILE_BACKEND = backend
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[tuple[str, str]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_qwen_style_tokenizer(tokenizer_dir)
        if "pretrain" in args.parts:
            peak = resolve_peak_flops(args.peak_tflops, device, dtype)
            rows += pretrain_rows(shape, tokenizer_dir, device, dtype, peak)
        if "t2i" in args.parts:
            rows += t2i_rows(shape, tokenizer_dir, device, dtype)
    if "encode" in args.parts:
        rows += encode_rows(shape, args.tiny, device, dtype)
    print(f"\nGPU suite: device {name}, {dtype}, {'tiny' if args.tiny else 'paper'} shapes, torch {torch.__version__}, "
          f"compile backend {backend}, {time.perf_counter() - start:.0f} s")
    print("| measurement | figure |")
    print("| --- | --- |")
    for label, figure in rows:
        print(f"| {label} | {figure} |")


if __name__ == "__main__":
    main()
