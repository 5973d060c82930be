"""unimm-generate-t2i and unimm-chat on a tiny saved UniMM model (in-process `main(argv)`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.entry.conftest import IMAGE_SIZE
from unimm.cli import chat, generate_t2i


def test_generate_t2i_writes_pngs_grid_and_is_seeded(tiny_unimm, toy, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a blue image\n\na yellow image\n")
    common = ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--prompts", "a red image",
              "a green image", "--prompts_file", str(prompts_file), "--batch_size", "4", "--grid_columns", "2",
              "--cfg_scale", "2.0", "--top_k", "16", "--top_p", "0.9", "--temperature", "1.0", "--seed", "5"]
    first = generate_t2i.main([*common, "--output_dir", str(tmp_path / "a")])
    assert [p.name for p in first] == ["0000_a_red_image.png", "0001_a_green_image.png", "0002_a_blue_image.png",
                                       "0003_a_yellow_image.png"]
    for path in first:
        assert Image.open(path).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    listed = json.loads((tmp_path / "a" / "prompts.json").read_text())
    assert [entry["prompt"] for entry in listed] == ["a red image", "a green image", "a blue image",
                                                     "a yellow image"]
    second = generate_t2i.main([*common, "--output_dir", str(tmp_path / "b")])
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))  # same seed, same images


def test_generate_t2i_negative_prompt_is_the_second_branch_of_guidance(tiny_unimm, toy, tmp_path, capsys):
    common = ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--prompts",
              "a red image", "--temperature", "0", "--seed", "5"]
    plain = generate_t2i.main([*common, "--cfg_scale", "0", "--output_dir", str(tmp_path / "plain")])
    # The prompt as its own negative cancels the guidance term: scale 6 gives the unguided image.
    itself = generate_t2i.main([*common, "--cfg_scale", "6", "--negative_prompt", "a red image",
                                "--output_dir", str(tmp_path / "itself")])
    assert np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(itself[0])))
    with pytest.raises(SystemExit) as exit_info:
        generate_t2i.main([*common, "--cfg_scale", "0", "--negative_prompt", "blue", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "negative_prompt" in capsys.readouterr().err


def test_generate_t2i_needs_prompts(tiny_unimm, toy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_t2i.main(["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]),
                           "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "no prompts" in capsys.readouterr().err


def test_chat_prints_and_writes_answers(tiny_unimm, toy, tmp_path, capsys):
    out = tmp_path / "answers.json"
    image = toy["images"] / "red_0.png"
    results = chat.main([
        "--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--images", str(image),
        "--questions", "what colour is it?", "is it round?", "--max_new_tokens", "4", "--output_json", str(out),
    ])
    printed = capsys.readouterr().out
    assert len(results) == 2
    for result in results:
        assert f"Q: {result['question']}\nA: {result['answer']}" in printed
        assert result["image"] == str(image)
    assert json.loads(out.read_text()) == results


def test_chat_rejects_mismatched_images(tiny_unimm, toy, capsys):
    image = str(toy["images"] / "red_0.png")
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]),
                                  "--images", image, image, "--questions", "a", "b", "c"])
    assert exit_info.value.code == 2 and "2 images for 3 questions" in capsys.readouterr().err
