"""Text-to-image with a trained UniMM model: sampled codes decoded by the visual tokenizer into one PNG per prompt,
a grid, and `prompts.json` (prompt -> file)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from unimm.inference.rerank import CANDIDATE_SEED_STRIDE, check_reranks, rerank
from unimm.inference.stack import InferenceStack


def slug(text: str, limit: int = 40) -> str:
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


def generate_pil_images(stack: InferenceStack, prompts: list[str], gen_args, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None,
                        choices: list | None = None) -> list:
    """One PIL image per prompt, sampled `gen_args.batch_size` prompts at a time; batch b is seeded `seed + b`.
    `gen_args.decode` (when set) picks `generate_images`' decode mode. `progress(done, total)`, if given, counts
    decoded positions over the whole call: batch b's position p is `b * N + p` of `total = batches * N`.
    `gen_args.rerank_samples` > 0 (when set): each batch also draws that many sampled rounds (round r seeded
    `seed + b + r * CANDIDATE_SEED_STRIDE`, `gen_args.rerank_temperature`) and keeps, per prompt, the candidate
    `unimm.inference.rerank` scores best; each prompt's `RerankChoice` is appended to `choices` when given. The
    progress count then covers every round."""
    from tqdm.auto import tqdm

    from unimm.llm.generation import generate_images

    visual = stack.visual_tokenizer
    images = []
    batches = range(0, len(prompts), gen_args.batch_size)
    negative = gen_args.negative_prompt
    rounds = getattr(gen_args, "rerank_samples", 0)
    if rounds:
        check_reranks(stack.model)
    total = len(batches) * visual.num_positions * (1 + rounds)
    for batch_index, start in enumerate(tqdm(batches, desc="generating", unit="batch")):
        batch = prompts[start: start + gen_args.batch_size]
        candidates = []
        for round_index in range(1 + rounds):
            done_before = (batch_index * (1 + rounds) + round_index) * visual.num_positions
            on_position = None if progress is None else (
                lambda done, _, before=done_before: progress(before + done, total))
            sampled = round_index > 0
            candidates.append(generate_images(
                stack.model, stack.text_tokenizer, batch,
                num_positions=visual.num_positions, cfg_scale=gen_args.cfg_scale or None,
                temperature=gen_args.rerank_temperature if sampled else gen_args.temperature,
                top_k=gen_args.top_k, top_p=gen_args.top_p,
                seed=seed + batch_index + round_index * CANDIDATE_SEED_STRIDE,
                negative_prompts=None if negative is None else [negative] * len(batch),
                decode=getattr(gen_args, "decode", "eager"),  # unimm.llm.generation.DECODE_MODES
                progress=on_position,
            ))
        codes = candidates[0]
        if rounds:
            codes, batch_choices = rerank(stack.model, stack.text_tokenizer, batch, candidates)
            if choices is not None:
                choices.extend(batch_choices)
        with torch.no_grad():
            pixels = visual.decode({name: value.to(stack.device) for name, value in codes.items()})
        images.extend(visual.postprocess(pixels))
    return images


def write_images(images: list, prompts: list[str], output_dir: str | Path, grid_columns: int = 8) -> list[Path]:
    """`<index>_<slug>.png` per image, `grid.png` and `prompts.json` in `output_dir`; returns the PNG paths."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(images):
        path = out_dir / f"{index:04d}_{slug(prompts[index])}.png"
        image.save(path)
        files.append(path)
    make_grid(images, grid_columns).save(out_dir / "grid.png")
    (out_dir / "prompts.json").write_text(json.dumps(
        [{"prompt": p, "file": f.name} for p, f in zip(prompts, files)], indent=2))
    return files
