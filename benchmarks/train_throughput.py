"""Pretraining throughput of the UniMM Trainer: tokens/s and MFU, padded vs packed batches.

The model is a random Qwen2-shaped LLM wrapped by UniMMForCausalLM with a DualToken-like codebook spec; samples
are a caption / text-to-image mixture with random codes and prompts of random length (so padding wastes compute
and packing recovers it). Throughput is measured by `UniMMTrainer`'s own logging (non-padding tokens per second
over the timed steps; MFU from `unimm.train.llm.mfu`), after warm-up steps.

    python benchmarks/train_throughput.py                      # CPU, tiny model (figures in results/train.md)
    python benchmarks/train_throughput.py --device cuda --size 0.5b --steps 30 --batch_size 16 --max_length 2048
    # 1.5b: --size 1.5b; bf16 on GPU; flash-attention 2 when installed (pip install 'unimm[flash]')

Packed rows hold several samples; transformers derives the block-diagonal mask from position_ids, which uses
flash-attention's varlen path on GPU (with sdpa the packed row is masked, not skipped).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
from pathlib import Path

import torch

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (128, 4, 4, 2, 352, 512),
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "1.5b": (1536, 28, 12, 2, 8960, 151936),
}
SPEC = {"pixel": {"num_codes": 1024, "depth": 4, "code_dim": 32},
        "semantic": {"num_codes": 1024, "depth": 4, "code_dim": 32}}


class SyntheticMixture(torch.utils.data.Dataset):
    """Caption and text-to-image samples with random prompts (4 .. max_prompt words) and random codes."""

    def __init__(self, factory, num_samples: int, num_positions: int, max_prompt: int, seed: int = 0):
        self.factory = factory
        self.num_samples = num_samples
        self.num_positions = num_positions
        self.max_prompt = max_prompt
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 100003 + index)
        words = int(torch.randint(4, self.max_prompt + 1, (1,), generator=generator))
        text = " ".join(["a red circle on the left of the image"] * (words // 9 + 1)).split()[:words]
        codes = {g: torch.randint(0, s["num_codes"], (self.num_positions, s["depth"]), generator=generator)
                 for g, s in SPEC.items()}
        from unimm.data.sequence import ImageSlot

        if index % 2:
            return self.factory.t2i(f"s{index}", " ".join(text), codes)
        return self.factory.caption(f"s{index}", " ".join(text), ImageSlot(codes=codes))


def build(size: str, dtype: torch.dtype, device: str, workdir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
    from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config
    from unimm.utils.attention import select_attn_implementation

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    build_qwen_style_tokenizer(workdir / "tok")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tok")
    config = tiny_llm_config("qwen2", vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, num_layers=layers,
                             num_heads=heads, num_kv_heads=kv, intermediate_size=inter, max_position_embeddings=8192)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                           attn_implementation=select_attn_implementation("auto", dtype))
    model = UniMMForCausalLM.from_llm(llm, SPEC, depth_head_layers=1 if size == "tiny" else 3)
    layout = extend_tokenizer_and_model(tokenizer, model, SPEC)
    return model.to(device), tokenizer, layout


def measure(model, tokenizer, layout, packing: bool, args, workdir: Path) -> dict[str, float]:
    from unimm.data.collator import UniMMCollator
    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.train.args import UniMMTrainingArguments
    from unimm.train.llm.trainer import UniMMTrainer
    from unimm.utils.runtime import prepare_training_arguments

    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=args.max_length, uncond_prob=0.1))
    # A packed batch takes as many samples as fit `batch_size` rows, so both modes see full rows.
    samples_per_batch = args.batch_size * (args.pack_factor if packing else 1)
    total_steps = args.warmup + args.steps
    dataset = SyntheticMixture(factory, samples_per_batch * total_steps, args.num_positions, args.max_prompt)
    training_args = UniMMTrainingArguments(
        output_dir=str(workdir / ("packed" if packing else "padded")), per_device_train_batch_size=samples_per_batch,
        max_steps=total_steps, logging_steps=1, save_strategy="no", report_to="none", learning_rate=1e-4,
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", dataloader_num_workers=args.workers,
        gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True, peak_tflops=args.peak_tflops,
    )
    prepare_training_arguments(training_args)
    collator = UniMMCollator(pad_token_id=tokenizer.pad_token_id, packing=packing,
                             max_length=args.max_length if packing else None)
    trainer = UniMMTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    timed = [e for e in trainer.state.log_history if "tokens_per_second" in e][args.warmup:]
    # One log per step: the harmonic mean of the per-step rates (steps carry similar token counts).
    tokens_per_second = len(timed) / sum(1.0 / e["tokens_per_second"] for e in timed)
    mfu_value = sum(e["mfu"] for e in timed) / len(timed)
    return {"tokens_per_second": tokens_per_second, "mfu": mfu_value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step")
    parser.add_argument("--pack_factor", type=int, default=3, help="samples offered per packed row")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--num_positions", type=int, default=64, help="visual positions per image")
    parser.add_argument("--max_prompt", type=int, default=120, help="longest prompt/caption in words")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None, help="default: GPU table / measured CPU matmul")
    parser.add_argument("--output", default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (False, True):
            model, tokenizer, layout = build(args.size, dtype, args.device, Path(tmp))
            results["packed" if packing else "padded"] = measure(model, tokenizer, layout, packing, args, Path(tmp))
    ratio = results["packed"]["tokens_per_second"] / results["padded"]["tokens_per_second"]
    lines = [
        f"### train_throughput ({args.device}, size {args.size}, {datetime.date.today()})",
        "",
        f"`python benchmarks/train_throughput.py --device {args.device} --size {args.size} --steps {args.steps} "
        f"--warmup {args.warmup} --batch_size {args.batch_size} --max_length {args.max_length}`",
        "",
        "| batches | tokens/s (non-padding) | MFU |",
        "| --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {100 * r['mfu']:.2f}% |")
    lines += ["", f"packed / padded tokens/s: {ratio:.2f}x", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
