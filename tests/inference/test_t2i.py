"""`unimm.inference.t2i`: file names, the grid and the prompt index written for generated images."""

from __future__ import annotations

import json

from PIL import Image

from unimm.inference.t2i import make_grid, slug, write_images


def test_write_images_names_files_by_index_and_prompt(tmp_path):
    images = [Image.new("RGB", (8, 6), colour) for colour in ("red", "green", "blue")]
    prompts = ["A red circle!", "a green   square", "???"]
    files = write_images(images, prompts, tmp_path / "out", grid_columns=2)
    assert [f.name for f in files] == ["0000_a_red_circle.png", "0001_a_green_square.png", "0002_prompt.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (16, 12)
    index = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert index == [{"prompt": p, "file": f.name} for p, f in zip(prompts, files)]


def test_grid_is_row_major_and_slug_is_bounded():
    images = [Image.new("RGB", (2, 2), (i * 40, 0, 0)) for i in range(3)]
    grid = make_grid(images, columns=3)
    assert [grid.getpixel((x, 0))[0] for x in (0, 2, 4)] == [0, 40, 80]
    assert len(slug("x" * 100)) == 40


def test_generate_pil_images_selects_the_decode_mode(tiny_unimm, toy, monkeypatch):
    """`gen_args.decode` reaches generate_images: the static-cache mode draws the pixels eager decoding draws."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    import unimm.llm.generation as generation
    from unimm.inference.stack import InferenceStack, load_for_inference
    from unimm.inference.t2i import generate_pil_images
    from unimm.tokenizer import load_visual_tokenizer

    model, text_tokenizer = load_for_inference(tiny_unimm, torch.device("cpu"))
    stack = InferenceStack(model, text_tokenizer, load_visual_tokenizer(toy["tokenizer"]), torch.device("cpu"))
    seen = []
    original = generation.generate_images
    monkeypatch.setattr(generation, "generate_images", lambda *a, **k: seen.append(k["decode"]) or original(*a, **k))
    args = dict(cfg_scale=2.0, temperature=0.0, top_k=None, top_p=None, batch_size=2, negative_prompt=None)
    prompts = ["a red image", "a blue image", "a green image"]
    eager = generate_pil_images(stack, prompts, SimpleNamespace(**args))
    static = generate_pil_images(stack, prompts, SimpleNamespace(**args, decode="static"))
    assert seen == ["eager", "eager", "static", "static"]
    assert [np.asarray(a).tolist() for a in eager] == [np.asarray(b).tolist() for b in static]
