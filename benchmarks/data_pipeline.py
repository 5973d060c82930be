"""Data-layer overheads, each as a ratio against a baseline measured in the same process (CPU by default).

1. Conversation sample building (chat template rendered twice + segment tokenisation + label construction)
   vs. a single `tokenizer.apply_chat_template(..., tokenize=True)` call on the same conversation.
2. Packing collation vs. padding collation of the same samples.
3. `pretokenize` (decode PNG, transform, encode, write Arrow shards) vs. bare `tokenizer.encode` on the same,
   already-transformed pixels.

    python benchmarks/data_pipeline.py [--records 400] [--images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unimm.data.collator import UniMMCollator
    from unimm.data.images import ImageTransform, load_image, read_image_records
    from unimm.data.pretokenize import pretokenize
    from unimm.data.sources import normalise_llava_record
    from unimm.data.tasks import SampleFactory
    from unimm.llm.vocab import extend_tokenizer_and_model
    from unimm.testing import build_qwen_style_tokenizer, tiny_llm_config
    from unimm.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_qwen_style_tokenizer(tmp / "tok")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tok")
        spec = {"semantic": {"num_codes": 512, "depth": 1, "code_dim": 32}}
        model = AutoModelForCausalLM.from_config(tiny_llm_config(vocab_size=len(tokenizer), hidden_size=16,
                                                                 num_layers=1, num_heads=2, num_kv_heads=1))
        layout = extend_tokenizer_and_model(tokenizer, model, spec)
        factory = SampleFactory(tokenizer, layout)
        turns = [("what colour is the shape?", "the shape is yellow"),
                 ("where is the shape?", "it is on the left of the image"),
                 ("describe the image in one sentence please", "a red circle on the left on a white background")]
        records = []
        for i in range(args.records):
            conv = []
            for question, answer in turns[: 1 + i % 3]:
                conv += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            records.append(normalise_llava_record({"id": str(i), "conversations": conv}, i, "bench"))
        messages = [[{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                     for t in r["conversations"]] for r in records]

        baseline = _timed(lambda: [tokenizer.apply_chat_template(m, tokenize=True) for m in messages])
        built = _timed(lambda: [factory.conversation(r, []) for r in records])
        print(f"sample building: {args.records / built:.0f} samples/s; apply_chat_template baseline "
              f"{args.records / baseline:.0f} samples/s; ratio {built / baseline:.2f}x")

        samples = [factory.conversation(r, []) for r in records[:64]]
        row = max(len(s) for s in samples) * 4
        padding = UniMMCollator(pad_token_id=tokenizer.pad_token_id)
        packing = UniMMCollator(pad_token_id=tokenizer.pad_token_id, packing=True, max_length=row)
        t_pad = _timed(lambda: [padding(samples) for _ in range(20)])
        t_pack = _timed(lambda: [packing(samples) for _ in range(20)])
        padded, packed = padding(samples), packing(samples)
        real = sum(len(s) for s in samples)
        print(f"collation of 64 samples: padding {t_pad / 20 * 1e3:.2f} ms, packing {t_pack / 20 * 1e3:.2f} ms "
              f"(time ratio {t_pack / t_pad:.2f}x); padding share of the batch: "
              f"{1 - real / padded['input_ids'].numel():.1%} padded vs {1 - real / packed['input_ids'].numel():.1%} "
              "packed")

        visual = build_tokenizer("vqrae-tiny").eval()
        folder = tmp / "images"
        folder.mkdir()
        for i in range(args.images):
            Image.new("RGB", (48, 40), ((i * 7) % 255, (i * 13) % 255, 90)).save(folder / f"{i:05d}.png")
        image_records = read_image_records(folder)
        transform = ImageTransform(visual.image_size, visual.image_mean, visual.image_std)
        pixels = torch.stack([transform(load_image(r["image"], r["id"])) for r in image_records])
        batch = 64

        def bare():
            with torch.no_grad():
                for start in range(0, len(pixels), batch):
                    visual.encode(pixels[start:start + batch])

        counter = iter(range(100))
        t_bare = _timed(bare)
        t_cache = _timed(lambda: pretokenize(image_records, visual, tmp / f"cache{next(counter)}", batch_size=batch,
                                             shard_size=1024, show_progress=False))
        print(f"pretokenize: {args.images / t_cache:.0f} img/s incl. PNG decode + Arrow write; bare encode "
              f"{args.images / t_bare:.0f} img/s; ratio {t_cache / t_bare:.2f}x")


if __name__ == "__main__":
    main()
