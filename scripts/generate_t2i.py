"""Text-to-image generation with a trained UniMM model: one PNG per prompt, a grid and prompts.json.

    python scripts/generate_t2i.py --model_path runs/pretrain --tokenizer_path runs/tokenizer \
        --prompts "a red circle on the left" "a blue square" --cfg_scale 3 --output_dir samples

Sampling: classifier-free guidance (`--cfg_scale`, 0 = off), `--temperature` (0 = greedy), `--top_k`, `--top_p`,
`--seed`, `--batch_size`; prompts from `--prompts` and/or `--prompts_file` (one per line).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from unimm.cli import ConfigError, parse_config, run_main
from unimm.train.arguments import GenerateArguments, InferenceArguments
from unimm.utils.logging import setup_logging


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def make_grid(images: list, columns: int):
    from PIL import Image

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def main(argv: list[str] | None = None) -> list[Path]:
    infer_args, gen_args = parse_config((InferenceArguments, GenerateArguments), sys.argv[1:] if argv is None else argv)
    setup_logging()
    import torch
    from tqdm.auto import tqdm

    from unimm.llm.generation import generate_images
    from unimm.train.build import load_inference_stack

    try:
        prompts = gen_args.all_prompts()
    except ValueError as err:  # no prompts given: a command-line mistake
        raise ConfigError(str(err)) from err
    model, tokenizer, visual, device = load_inference_stack(infer_args)
    out_dir = Path(gen_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    images = []
    batches = range(0, len(prompts), gen_args.batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc="generating", unit="batch")):
        batch = prompts[start: start + gen_args.batch_size]
        codes = generate_images(
            model, tokenizer, batch, num_positions=visual.num_positions, cfg_scale=gen_args.cfg_scale or None,
            temperature=gen_args.temperature, top_k=gen_args.top_k, top_p=gen_args.top_p,
            seed=infer_args.seed + batch_index,
        )
        with torch.no_grad():
            pixels = visual.decode({name: value.to(device) for name, value in codes.items()})
        for offset, image in enumerate(visual.postprocess(pixels)):
            index = start + offset
            path = out_dir / f"{index:04d}_{_slug(prompts[index])}.png"
            image.save(path)
            files.append(path)
            images.append(image)
    make_grid(images, gen_args.grid_columns).save(out_dir / "grid.png")
    (out_dir / "prompts.json").write_text(json.dumps(
        [{"prompt": p, "file": f.name} for p, f in zip(prompts, files)], indent=2))
    print(f"wrote {len(files)} images and grid.png to {out_dir}")
    return files


if __name__ == "__main__":
    run_main(main)
