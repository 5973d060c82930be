"""The shapes-specific steps of `scripts/quickstart.sh`, run by `unimm-quickstart-eval` (`scripts/quickstart_eval.py`):
write the data and the tiny starting LLM, then score the tokenizer's reconstructions, the generated images and the
answers with the pixel checker.

    python scripts/quickstart_eval.py prepare --out runs/quickstart
    python scripts/quickstart_eval.py tokenizer --out runs/quickstart --tokenizer_path runs/quickstart/tokenizer/model
    python scripts/quickstart_eval.py generation --out runs/quickstart --generated_dir runs/quickstart/generated
    python scripts/quickstart_eval.py qa --out runs/quickstart --answers_json runs/quickstart/answers.json

Each scoring command prints one `<name> accuracy: <number>` line and appends its figures to `<out>/scores.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unimm.data.toy.shapes import (
    DESCRIBE_QUESTION,
    QUESTIONS,
    ShapesConfig,
    ShapesDataset,
    all_combinations,
    split_combinations,
    write_image_text_jsonl,
    write_llava_json,
)
from unimm.data.toy.shapes_eval import exact_match, reconstruction_scores, score_images

TEST_SEED = 1000  # held-out images use seeds far from the training seed


def _data_config(args: argparse.Namespace) -> ShapesConfig:
    # Larger shapes, one background grey, no position jitter and little colour jitter, unlike the library
    # defaults: at 32 px a 4x4-patch tokenizer trained for a few minutes keeps big shapes' outlines, and every
    # background tint, sub-patch offset or colour shade multiplies the codes the tiny LLM must learn to place (its
    # frozen random encoder also makes codes depend on the patch position). Measured: the mean entropy of a
    # position's first pixel code among images of one caption falls from 0.89 to 0.08 nats.
    return ShapesConfig(image_size=args.image_size, size_range=(args.size_min, args.size_max),
                        position_jitter=args.position_jitter, colour_jitter=args.colour_jitter,
                        background_range=(args.background_min, args.background_max))


def _update_scores(out: Path, name: str, values: dict) -> None:
    path = out / "scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    scores[name] = values
    path.write_text(json.dumps(scores, indent=2))


def prepare(args: argparse.Namespace) -> None:
    """Shapes data (train: LLaVA JSON + captions jsonl; test: LLaVA JSON, QA chat config, generation prompts) and a
    tiny random Qwen2 with a BPE tokenizer trained on the shapes vocabulary."""
    from transformers import AutoTokenizer

    from unimm.testing import build_qwen_style_tokenizer, build_tiny_llm

    out = Path(args.out)
    config = _data_config(args)
    train_combos, held_out = split_combinations(args.held_out_prompts, seed=args.seed)
    train = ShapesDataset(args.train_samples, seed=args.seed, config=config, combinations=train_combos,
                          id_prefix="train")
    write_llava_json(train, out / "data" / "train", "llava.json")
    write_image_text_jsonl(train, out / "data" / "train", "captions.jsonl")
    # Held-out images for QA and tokenizer fidelity: new seed, every combination.
    test = ShapesDataset(args.test_samples, seed=TEST_SEED + args.seed, config=config, id_prefix="test")
    write_llava_json(test, out / "data" / "test", "llava.json")
    images, questions, answers = [], [], []
    for sample in test:
        for attribute, question in QUESTIONS.items():
            images.append(str((out / "data" / "test" / "images" / f"{sample.id}.png").resolve()))
            questions.append(question)
            answers.append(sample.attributes[attribute])
    (out / "data" / "test" / "qa.yaml").write_text(json.dumps({"images": images, "questions": questions}))
    (out / "data" / "test" / "qa_answers.json").write_text(json.dumps(answers))
    # Generation prompts: the held-out combinations (never seen in training) first, then seen ones.
    prompts = [c.caption for c in held_out] + [c.caption for c in train_combos]
    (out / "data" / "prompts.txt").write_text("\n".join(prompts[: args.num_prompts]) + "\n")
    (out / "data" / "held_out_prompts.json").write_text(json.dumps([c.caption for c in held_out]))

    corpus = [c.caption for c in all_combinations()] + list(QUESTIONS.values()) + [DESCRIBE_QUESTION]
    text_dir = out / "llm"
    build_qwen_style_tokenizer(text_dir / "text_tokenizer", corpus, vocab_size=args.text_vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(text_dir / "text_tokenizer")
    build_tiny_llm(text_dir, "qwen2", tokenizer, seed=args.seed, hidden_size=args.hidden_size,
                   num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                   intermediate_size=2 * args.hidden_size, max_position_embeddings=512)
    print(f"wrote {len(train)} training and {len(test)} held-out shapes images under {out / 'data'}, "
          f"{min(len(prompts), args.num_prompts)} generation prompts ({len(held_out)} held out), "
          f"a tiny Qwen2 (hidden {args.hidden_size}, {args.num_layers} layers) in {text_dir}")


def tokenizer_fidelity(args: argparse.Namespace) -> float:
    """Checker accuracy on the tokenizer's reconstructions of held-out images."""
    from unimm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = ShapesDataset(args.test_samples, seed=TEST_SEED + args.seed + 1, config=_data_config(args))
    scores = reconstruction_scores(tokenizer, dataset)
    _update_scores(Path(args.out), "tokenizer_reconstruction", scores.to_dict())
    print(f"tokenizer reconstruction accuracy: {scores.accuracy:.3f} (colour {scores.colour:.3f}, "
          f"shape {scores.shape:.3f}, position {scores.position:.3f}; {scores.num_images} held-out images)")
    return scores.accuracy


def _caption_attributes() -> dict[str, tuple[str, str, str]]:
    return {c.caption: (c.colour, c.shape, c.position) for c in all_combinations()}


def generation(args: argparse.Namespace) -> float:
    """Checker accuracy of the images `scripts/generate_t2i.py` wrote (its prompts.json maps prompt -> file)."""
    from PIL import Image

    generated = Path(args.generated_dir)
    index = json.loads((generated / "prompts.json").read_text())
    expected_by_caption = _caption_attributes()
    unknown = [row["prompt"] for row in index if row["prompt"] not in expected_by_caption]
    if unknown:
        raise ValueError(f"{generated / 'prompts.json'}: prompts that are not shapes captions: {unknown[:3]}")
    images = [Image.open(generated / row["file"]).convert("RGB") for row in index]
    expected = [expected_by_caption[row["prompt"]] for row in index]
    scores = score_images(images, expected)
    held_out = set(json.loads((Path(args.out) / "data" / "held_out_prompts.json").read_text()))
    rows = [i for i, row in enumerate(index) if row["prompt"] in held_out]
    values = scores.to_dict()
    if rows:
        values["held_out_prompts"] = score_images([images[i] for i in rows], [expected[i] for i in rows]).to_dict()
    _update_scores(Path(args.out), "generation", values)
    print(f"generation accuracy: {scores.accuracy:.3f} (colour+shape {scores.colour_and_shape:.3f}, colour "
          f"{scores.colour:.3f}, shape {scores.shape:.3f}, position {scores.position:.3f}; {scores.num_images} images"
          + (f"; held-out prompts {values['held_out_prompts']['accuracy']:.3f} over {len(rows)}" if rows else "")
          + f") images in {generated}")
    return scores.accuracy


def qa(args: argparse.Namespace) -> float:
    """Exact-match accuracy of `scripts/chat.py`'s answers to the held-out questions."""
    out = Path(args.out)
    answers = json.loads((out / "data" / "test" / "qa_answers.json").read_text())
    results = json.loads(Path(args.answers_json).read_text())
    predictions = [row["answer"] for row in results]
    accuracy = exact_match(predictions, answers)
    per_question: dict[str, list[bool]] = {}
    for row, answer in zip(results, answers):
        per_question.setdefault(row["question"], []).append(row["answer"].strip().lower() == answer)
    by_question = {q: sum(v) / len(v) for q, v in per_question.items()}
    _update_scores(out, "qa", {"accuracy": accuracy, "num_questions": len(answers), "by_question": by_question})
    examples = "; ".join(f"{r['question']} -> {r['answer']!r}" for r in results[:3])
    print(f"QA accuracy: {accuracy:.3f} ({len(answers)} questions on held-out images; e.g. {examples})")
    return accuracy


# (flag, type, default, help): the shapes-data options every command takes, then those of `prepare`.
COMMON_OPTIONS = (
    ("--seed", int, 0, "Seed of the training data (held-out data derive from it)."),
    ("--image_size", int, 32, "Side of the shapes images."),
    ("--test_samples", int, 72, "Held-out images (QA asks 3 questions each)."),
    ("--size_min", float, 0.42, "Smallest shape extent (fraction of the side)."),
    ("--size_max", float, 0.44, "Largest shape extent (fraction of the side)."),
    ("--position_jitter", float, 0.0, "Shape centre jitter (fraction)."),
    ("--colour_jitter", int, 4, "Max per-channel jitter of the shape colour."),
    ("--background_min", int, 240, "Lowest background channel value."),
    ("--background_max", int, 240, "Highest background channel value."),
)
PREPARE_OPTIONS = (
    ("--train_samples", int, 2048, "Training images."),
    ("--held_out_prompts", int, 0, "Attribute combinations never shown in training (generation prompts test them "
                                   "first)."),
    ("--num_prompts", int, 72, "Generation prompts written to prompts.txt."),
    ("--text_vocab_size", int, 300, "BPE vocabulary of the tiny text tokenizer."),
    ("--hidden_size", int, 256, "Tiny Qwen2 width."),
    ("--num_layers", int, 4, "Tiny Qwen2 depth."),
    ("--num_heads", int, 4, "Tiny Qwen2 attention heads."),
    ("--num_kv_heads", int, 2, "Tiny Qwen2 key/value heads."),
)


# command -> (function, its required path option and that option's help)
COMMANDS = {
    "tokenizer": (tokenizer_fidelity, "--tokenizer_path", "Saved visual tokenizer."),
    "generation": (generation, "--generated_dir", "Output directory of scripts/generate_t2i.py."),
    "qa": (qa, "--answers_json", "--output_json of scripts/chat.py."),
}


def _add_options(parser: argparse.ArgumentParser, options: tuple) -> None:
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=text)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="Quickstart run directory.")
    _add_options(common, COMMON_OPTIONS)
    prepare_parser = sub.add_parser("prepare", parents=[common], help=prepare.__doc__)
    _add_options(prepare_parser, PREPARE_OPTIONS)
    prepare_parser.set_defaults(func=prepare)
    for name, (func, path_flag, path_help) in COMMANDS.items():
        command = sub.add_parser(name, parents=[common], help=func.__doc__)
        command.add_argument(path_flag, required=True, help=path_help)
        command.set_defaults(func=func)
    return parser
