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


def test_generate_t2i_rerank_keeps_the_candidate_the_model_scores_best(tiny_unimm, toy, tmp_path, capsys):
    """`--rerank_samples 3`: the configured decoding's image and 3 sampled candidates per prompt (seeded as
    documented), each scored by the caption NLL (the mean cross-entropy of the prompt's tokens and EOS after the
    candidate's codes, recomputed here from the logits) plus the image NLL; the written image is the decoding of the
    lowest sum. The configured decoding samples too (an untrained model's greedy image would win every time)."""
    import torch

    from unimm.data.collator import UniMMCollator
    from unimm.data.sequence import ImageSlot
    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.inference.rerank import CANDIDATE_SEED_STRIDE
    from unimm.inference.stack import load_for_inference
    from unimm.llm.generation import generate_images
    from unimm.tokenizer import load_visual_tokenizer

    torch.set_num_threads(1)
    prompts = ["a red image", "a green image", "a blue image", "a yellow image"]
    common = ["--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--prompts", *prompts,
              "--cfg_scale", "0", "--temperature", "1", "--top_k", "16", "--seed", "3", "--batch_size", "4"]
    files = generate_t2i.main([*common, "--rerank_samples", "3", "--output_dir", str(tmp_path / "rr")])
    report = json.loads((tmp_path / "rr" / "rerank.json").read_text())
    assert report["rerank_samples"] == 3 and [c["prompt"] for c in report["choices"]] == prompts
    assert "rerank: kept the configured decoding's image for" in capsys.readouterr().out

    model, text_tokenizer = load_for_inference(tiny_unimm, torch.device("cpu"))
    visual = load_visual_tokenizer(toy["tokenizer"])
    rounds = [generate_images(model, text_tokenizer, prompts, num_positions=visual.num_positions, cfg_scale=None,
                              temperature=1.0, top_k=16, seed=3 + r * CANDIDATE_SEED_STRIDE)
              for r in range(4)]
    factory = SampleFactory(text_tokenizer, model.config.layout, SampleConfig(max_length=None))
    collate = UniMMCollator(pad_token_id=text_tokenizer.pad_token_id)
    for index, (prompt, choice) in enumerate(zip(prompts, report["choices"])):
        caption_nll = []
        for codes in rounds:
            image = {name: value[index] for name, value in codes.items()}
            batch = collate([factory.caption("c", prompt, ImageSlot(codes=image))])
            labels = batch.pop("labels")[0, 1:]
            batch.pop("sample_ids", None)
            with torch.no_grad():
                logits = model(**batch).logits[0, :-1].float()
            supervised = labels != -100
            caption_nll.append(float(torch.nn.functional.cross_entropy(logits[supervised], labels[supervised])))
        torch.testing.assert_close(choice["caption_nll"], caption_nll, rtol=1e-4, atol=1e-5)
        totals = [c + i for c, i in zip(choice["caption_nll"], choice["image_nll"])]
        assert choice["chosen"] == min(range(4), key=lambda r: (totals[r], r))
        chosen = {name: value[index: index + 1] for name, value in rounds[choice["chosen"]].items()}
        with torch.no_grad():
            expected = visual.postprocess(visual.decode(chosen))[0]
        assert np.array_equal(np.asarray(Image.open(files[index])), np.asarray(expected))
    assert any(choice["chosen"] != 0 for choice in report["choices"])  # a sampled candidate was kept somewhere

    plain = generate_t2i.main([*common, "--output_dir", str(tmp_path / "plain")])  # off: round 0's images, no report
    assert not (tmp_path / "plain" / "rerank.json").exists()
    for index, path in enumerate(plain):
        first = {name: value[index: index + 1] for name, value in rounds[0].items()}
        with torch.no_grad():
            expected = visual.postprocess(visual.decode(first))[0]
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))


def test_rerank_refuses_a_model_that_reads_images_as_features():
    from types import SimpleNamespace

    from unimm.inference.rerank import check_reranks
    from unimm.utils.errors import OptionError

    with pytest.raises(OptionError, match="rerank_samples"):
        check_reranks(SimpleNamespace(feature_projector=object(), visual_embedding=object()))
    with pytest.raises(ValueError, match="rerank_samples"):
        from unimm.inference.args import GenerateArguments

        GenerateArguments(prompts=["a"], rerank_samples=-1)
