"""The shapes-specific steps of `scripts/quickstart.sh`, run by `unimm-quickstart-eval` (`scripts/quickstart_eval.py`):
write the data (`unimm.data.toy.quickstart`) and the tiny starting LLM, then score the tokenizer's reconstructions,
the generated images and the answers with the pixel checker.

    python scripts/quickstart_eval.py prepare --out runs/quickstart
    python scripts/quickstart_eval.py tokenizer --out runs/quickstart \
        --visual_tokenizer_path runs/quickstart/tokenizer/model
    python scripts/quickstart_eval.py generation --out runs/quickstart --generated_dir runs/quickstart/generated
    python scripts/quickstart_eval.py qa --out runs/quickstart --answers_json runs/quickstart/answers.json
    python scripts/quickstart_eval.py cfg --out runs/quickstart --model_path runs/quickstart/finetune \
        --visual_tokenizer_path runs/quickstart/tokenizer/model

Each scoring command prints `<name> accuracy: <number>` lines (generation: one for the captions seen in training,
one `held-out generation accuracy` for the captions never trained on) and adds its figures to `<out>/scores.json`.
`cfg` scores the held-out captions at several guidance scales, greedy and sampled, and prints a table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from unimm.data.code_cache import write_json_atomic
from unimm.data.toy.quickstart import (
    CAPTION_CONVERSATIONS,
    TEST_SEED,
    caption_attributes,
    held_out_captions,
    text_corpus,
    validation_captions,
    write_quickstart_data,
)
from unimm.data.toy.shapes import ShapesConfig, ShapesDataset
from unimm.data.toy.shapes_eval import exact_match, reconstruction_scores, score_images

__all__ = ["COMMANDS", "best_scale", "count_text", "make_parser"]


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
    """Set `name` in `<out>/scores.json`. Stages 6-7 score in concurrent processes: each update holds an exclusive
    lock on `scores.json.lock` while it reads, changes and replaces the file (written whole, then renamed), so no
    process loses another's entry and a reader never sees half a file."""
    path = out / "scores.json"
    with open(out / "scores.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scores = json.loads(path.read_text()) if path.is_file() else {}
        scores[name] = values
        write_json_atomic(path, scores)


def prepare(args: argparse.Namespace) -> None:
    """Shapes data (train: LLaVA JSON + captions jsonl; test: LLaVA JSON, QA chat config, generation prompts) and a
    tiny random Qwen2 with a BPE tokenizer trained on the shapes vocabulary."""
    from transformers import AutoTokenizer

    from unimm.testing import build_qwen_style_tokenizer, build_tiny_llm

    out = Path(args.out)
    written = write_quickstart_data(
        out, _data_config(args), seed=args.seed, train_samples=args.train_samples, test_samples=args.test_samples,
        held_out_prompts=args.held_out_prompts, num_prompts=args.num_prompts, partial_captions=args.partial_captions,
        partial_caption_kinds=args.partial_caption_kinds.split(","), scenes=args.scenes,
        caption_conversations=args.caption_conversations, validation_prompts=args.validation_prompts)
    text_dir = out / "llm"
    build_qwen_style_tokenizer(text_dir / "text_tokenizer", text_corpus(), vocab_size=args.text_vocab_size)
    text_tokenizer = AutoTokenizer.from_pretrained(text_dir / "text_tokenizer")
    # The untied Qwen2 structure (Qwen2.5-7B's kind) at rope theta 1e4: the model every recorded quickstart figure
    # (benchmarks/results/quickstart*.md) was measured with.
    build_tiny_llm(text_dir, "qwen2.5-7b", text_tokenizer, seed=args.seed, hidden_size=args.hidden_size,
                   num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                   intermediate_size=2 * args.hidden_size, max_position_embeddings=512,
                   attention_dropout=args.attention_dropout,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    print(f"wrote {written.num_train} training and {written.num_test} held-out shapes images under {out / 'data'}, "
          f"{written.num_prompts} generation prompts ({written.num_held_out_prompts} of the {written.num_held_out} "
          f"held-out captions), {written.num_validation} seen captions for validation, a tiny Qwen2 "
          f"(hidden {args.hidden_size}, {args.num_layers} layers) in {text_dir}")


def tokenizer_fidelity(args: argparse.Namespace) -> float:
    """Checker accuracy on the tokenizer's reconstructions of held-out images."""
    from unimm.tokenizer import load_tokenizer

    visual_tokenizer = load_tokenizer(args.visual_tokenizer_path)
    dataset = ShapesDataset(args.test_samples, seed=TEST_SEED + args.seed + 1, config=_data_config(args))
    scores = reconstruction_scores(visual_tokenizer, dataset)
    _update_scores(Path(args.out), "tokenizer_reconstruction", scores.to_dict())
    print(f"tokenizer reconstruction accuracy: {scores.accuracy:.3f} (colour {scores.colour:.3f}, "
          f"shape {scores.shape:.3f}, position {scores.position:.3f}; {scores.num_images} held-out images)")
    return scores.accuracy


def _describe(scores) -> str:
    return (f"colour+shape {scores.colour_and_shape:.3f}, colour {scores.colour:.3f}, shape {scores.shape:.3f}, "
            f"position {scores.position:.3f}; {scores.num_images} images")


def generation(args: argparse.Namespace) -> float:
    """Checker accuracy of the images `scripts/generate_t2i.py` wrote (its prompts.json maps prompt -> file), apart
    for the captions seen in training and for the held-out ones."""
    from PIL import Image

    out = Path(args.out)
    generated = Path(args.generated_dir)
    index = json.loads((generated / "prompts.json").read_text())
    expected_by_caption = caption_attributes()
    unknown = [row["prompt"] for row in index if row["prompt"] not in expected_by_caption]
    if unknown:
        raise ValueError(f"{generated / 'prompts.json'}: prompts that are not shapes captions: {unknown[:3]}")
    held_out = held_out_captions(out)
    groups: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for row in index:
        images, expected = groups[row["prompt"] in held_out]
        images.append(Image.open(generated / row["file"]).convert("RGB"))
        expected.append(expected_by_caption[row["prompt"]])
    seen = score_images(*groups[False]) if groups[False][0] else None
    held = score_images(*groups[True]) if groups[True][0] else None
    _update_scores(out, "generation", seen.to_dict() if seen else {"accuracy": None, "num_images": 0})
    _update_scores(out, "generation_held_out", held.to_dict() if held else {"accuracy": None, "num_images": 0})
    if (generated / "rerank.json").exists():  # best-of-N images (generate_t2i.py --rerank_samples)
        report = json.loads((generated / "rerank.json").read_text())
        kept = sum(choice["chosen"] == 0 for choice in report["choices"])
        _update_scores(out, "rerank", {"samples": report["rerank_samples"], "prompts": len(report["choices"]),
                                       "kept_configured": kept})
        print(f"reranked: each image the best of the configured decoding's and {report['rerank_samples']} sampled "
              f"candidates by the model's caption + image NLL; the configured decoding's kept for {kept} of "
              f"{len(report['choices'])} prompts")
    if seen:
        print(f"generation accuracy: {seen.accuracy:.3f} (captions seen in training; {_describe(seen)})")
    else:
        print("generation accuracy: n/a (no prompt is a training caption)")
    if held:
        print(f"held-out generation accuracy: {held.accuracy:.3f} (captions never trained on; {_describe(held)})")
    else:
        print("held-out generation accuracy: n/a (no caption held out)")
    print(f"images in {generated}")
    return seen.accuracy if seen else 0.0


def _accuracy_by_scale(args: argparse.Namespace, prompts: list[str], scales: list[float]) -> list[dict]:
    """Checker accuracy of the images `args.model_path` draws for `prompts` at each guidance scale (1 = none),
    greedy and sampled (temperature 1, `args.top_k`; `args.samples` images per prompt): one row per decoding and
    scale."""
    import torch

    from unimm.inference.stack import load_for_inference
    from unimm.llm.generation import generate_images
    from unimm.tokenizer import load_visual_tokenizer

    device = torch.device("cpu")
    model, text_tokenizer = load_for_inference(args.model_path, device, "float32")
    visual = load_visual_tokenizer(args.visual_tokenizer_path).to(device)
    expected_by_caption = caption_attributes()
    rows = []
    for mode in ("greedy", "sampled"):
        repeats = 1 if mode == "greedy" else args.samples
        if not repeats:
            continue
        batch = [p for p in prompts for _ in range(repeats)]
        for scale in scales:
            codes = generate_images(model, text_tokenizer, batch, num_positions=visual.num_positions,
                                    cfg_scale=None if scale == 1 else scale,
                                    temperature=0.0 if mode == "greedy" else 1.0,
                                    top_k=None if mode == "greedy" else args.top_k, seed=args.seed)
            with torch.no_grad():
                images = visual.postprocess(visual.decode(codes))
            scores = score_images(images, [expected_by_caption[p] for p in batch])
            rows.append({"decoding": mode if mode == "greedy" else f"sampled (temperature 1, top-k {args.top_k})",
                         "cfg_scale": scale, **scores.to_dict()})
    return rows


def _print_scale_table(rows: list[dict], scales: list[float]) -> None:
    print("| decoding | " + " | ".join("cfg 1 (none)" if s == 1 else f"cfg {s:g}" for s in scales) + " |")
    print("| --- " * (len(scales) + 1) + "|")
    for mode in dict.fromkeys(r["decoding"] for r in rows):
        cells = {r["cfg_scale"]: r for r in rows if r["decoding"] == mode}
        print(f"| {mode} | " + " | ".join(f"{cells[s]['accuracy']:.3f} ({count_text(cells[s])})" for s in scales) + " |")


def _scales(args: argparse.Namespace) -> list[float]:
    return sorted(dict.fromkeys(args.scales), key=lambda s: (s != 1, s))  # no guidance first


def cfg_table(args: argparse.Namespace) -> list[dict]:
    """Held-out generation accuracy at each guidance scale (1 = none), greedy and sampled (temperature 1, top-k;
    `--samples` images per caption). A report only: the scale stage 6 decodes with is the recipe's or chosen on the
    validation captions (`guidance`), never here."""
    out = Path(args.out)
    prompt_lines = [p for p in (out / "data" / "prompts.txt").read_text().split("\n") if p]
    held_out = held_out_captions(out)
    prompts = [p for p in prompt_lines if p in held_out]
    if not prompts:
        print("cfg: no held-out caption among the prompts; nothing to compare")
        return []
    scales = _scales(args)
    rows = _accuracy_by_scale(args, prompts, scales)
    _update_scores(out, "cfg_held_out", {"prompts": len(prompts), "samples_per_prompt": args.samples, "rows": rows})
    print(f"held-out generation accuracy by guidance scale ({len(prompts)} held-out captions; sampled: "
          f"{args.samples} images each)")
    _print_scale_table(rows, scales)
    return rows


def best_scale(rows: list[dict]) -> tuple[float, int]:
    """(scale, images right) of the guidance scale whose images (every decoding pooled) are most often right, the
    smallest such scale on a tie (the least guidance that does as well)."""
    right: dict[float, int] = {}
    for row in rows:
        right[row["cfg_scale"]] = right.get(row["cfg_scale"], 0) + round(row["accuracy"] * row["num_images"])
    chosen = min(right, key=lambda s: (-right[s], s))
    return chosen, right[chosen]


def choose_guidance(args: argparse.Namespace) -> float:
    """The guidance scale of stage 6: the recipe's (`--scale`), or else chosen on the validation split of the seen
    captions (never on the held-out ones): the scale whose greedy and sampled images together are most often right,
    the smallest such scale on a tie. Writes it to `<out>/guidance_scale` and `scores.json` (`guidance`, with its
    `source`); without validation captions the `--default` scale is kept."""
    out = Path(args.out)
    prompts = validation_captions(out)
    scales = _scales(args)
    if args.scale is not None:
        if args.scale < 1:
            raise SystemExit(f"--scale must be 1 (no guidance) or more, got {args.scale:g}")
        chosen, rows, source = args.scale, [], "recipe"
        print(f"guidance: scale {chosen:g}, the recipe's (not chosen on this run; `--guidance validation` chooses it "
              f"on the {len(prompts)} validation captions)")
    elif not prompts:
        chosen, rows, source = args.default, [], "default"
        print(f"guidance: no validation captions in {out / 'data'}; stage 6 keeps guidance scale {chosen:g}")
    else:
        rows = _accuracy_by_scale(args, prompts, scales)
        chosen, right = best_scale(rows)
        source = "validation"
        print(f"validation generation accuracy by guidance scale ({len(prompts)} validation captions, a split of the "
              f"seen ones; sampled: {args.samples} images each)")
        _print_scale_table(rows, scales)
        print(f"guidance: scale {chosen:g} chosen on the validation captions ({right} of "
              f"{sum(r['num_images'] for r in rows if r['cfg_scale'] == chosen)} images right)")
    _update_scores(out, "guidance", {"chosen": chosen, "source": source, "validation_prompts": len(prompts),
                                     "samples_per_prompt": args.samples, "rows": rows})
    (out / "guidance_scale").write_text(f"{chosen:g}\n")
    return chosen


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
    ("--held_out_prompts", int, 24, "Attribute combinations never shown in training (generation prompts test them "
                                    "first); 0 = every caption is also a training caption."),
    ("--validation_prompts", int, 0, "Seen (trained) combinations set apart as the validation split: settings (the "
                                     "guidance scale) are chosen on them, and the seen-caption figure is reported on "
                                     "the others."),
    ("--num_prompts", int, 72, "Generation prompts written to prompts.txt."),
    ("--partial_captions", float, 0.0, "Fraction of training images that get a second caption record naming only "
                                       "their position or only their colour and shape (0 = none)."),
    ("--partial_caption_kinds", str, "position", "Comma-separated kinds of partial caption, used in turn: "
                                                 "position, pair."),
    ("--scenes", float, 0.0, "Two-shape images to add to the caption records, as a fraction of --train_samples: "
                              "each shape a training combination, named in a random order, so only the position "
                              "words tell which pair sits where (0 = none)."),
    ("--caption_conversations", string_to_bool, False,
     f"Also write the training captions as one-turn LLaVA conversations (data/train/{CAPTION_CONVERSATIONS}): the "
     "VQRAE quickstart pretrains understanding on them from pixels."),
    ("--text_vocab_size", int, 300, "BPE vocabulary of the tiny text tokenizer."),
    ("--hidden_size", int, 256, "Tiny Qwen2 width."),
    ("--num_layers", int, 4, "Tiny Qwen2 depth."),
    ("--num_heads", int, 4, "Tiny Qwen2 attention heads."),
    ("--num_kv_heads", int, 2, "Tiny Qwen2 key/value heads."),
    ("--attention_dropout", float, 0.0, "Tiny Qwen2 attention dropout (in training only). 0.1 moved held-out "
                                        "generation by seed in opposite directions (benchmarks/results/quickstart.md)."),
)


# command -> (function, its required path option and that option's help)
COMMANDS = {
    "tokenizer": (tokenizer_fidelity, "--visual_tokenizer_path", "Saved visual tokenizer."),
    "generation": (generation, "--generated_dir", "Output directory of scripts/generate_t2i.py."),
    "qa": (qa, "--answers_json", "--output_json of scripts/chat.py."),
}


# old spellings still accepted (`--tokenizer_path` named the visual tokenizer before text and visual were told apart)
_ALIASES = {"--visual_tokenizer_path": ("--tokenizer_path",)}


def _add_options(parser: argparse.ArgumentParser, options: tuple) -> None:
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=text)


# The README's quickstart targets: (figure in scores.json, label, minimum). The VQRAE variant's held-out figure is
# reported beside its targets, not judged (its frozen-feature pretraining is not tuned for unseen captions).
TARGETS = {
    "dualtoken": (("generation", "generation, seen captions", 0.9),
                  ("generation_held_out", "generation, held-out captions", 0.8),
                  ("qa", "QA on held-out images", 0.9)),
    "vqrae": (("generation", "generation, seen captions", 0.9),
              ("generation_held_out", "generation, held-out captions", None),
              ("qa", "QA on held-out images", 0.9)),
}
TIME_TARGET_S = 900


def count_text(entry: dict) -> str:
    """`hits/total` of a score entry (its accuracy times its image or question count)."""
    total = entry.get("num_images", entry.get("num_questions"))
    if entry.get("accuracy") is None or not total:
        return "n/a"
    return f"{round(entry['accuracy'] * total)}/{total}"


def judge(args: argparse.Namespace) -> list[dict]:
    """The run's figures against the README's targets: a table of each figure (with its count), its target and
    pass/fail. A missed target is a result, not an error: the command exits 0 either way."""
    out = Path(args.out)
    path = out / "scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    rows = []
    for key, label, target in TARGETS[args.tokenizer]:
        entry = scores.get(key) or {}
        value = entry.get("accuracy")
        verdict = "-" if target is None else ("pass" if value is not None and value >= target else "FAIL")
        rows.append({"figure": label, "value": value, "count": count_text(entry), "target": target, "verdict": verdict})
    if args.elapsed is not None:
        rows.append({"figure": "time end to end", "value": args.elapsed, "count": f"{args.elapsed:.0f} s",
                     "target": TIME_TARGET_S, "verdict": "pass" if args.elapsed <= TIME_TARGET_S else "FAIL"})
    _update_scores(out, "judged", {"tokenizer": args.tokenizer, "rows": rows})
    print("| figure | result | target | verdict |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        if row["figure"] == "time end to end":
            result, target = row["count"], f"<= {row['target']} s"
        else:
            result = "n/a" if row["value"] is None else f"{row['value']:.3f} ({row['count']})"
            target = "reported" if row["target"] is None else f">= {row['target']}"
        print(f"| {row['figure']} | {result} | {target} | {row['verdict']} |")
    judged = [row for row in rows if row["verdict"] != "-"]
    passed = sum(row["verdict"] == "pass" for row in judged)
    print(f"{passed} of {len(judged)} targets met" + ("" if passed == len(judged) else
          " (recorded runs and what they varied: benchmarks/results/quickstart*.md)"))
    return rows


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
        command.add_argument(path_flag, *_ALIASES.get(path_flag, ()), required=True, help=path_help)
        command.set_defaults(func=func)
    command = sub.add_parser("cfg", parents=[common], help=cfg_table.__doc__)
    command.add_argument("--model_path", required=True, help="The trained UniMM model (finetune output).")
    command.add_argument("--visual_tokenizer_path", *_ALIASES["--visual_tokenizer_path"], required=True,
                         help="Its visual tokenizer.")
    command.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="Guidance scales (1 = none).")
    command.add_argument("--samples", type=int, default=4, help="Sampled images per held-out caption.")
    command.add_argument("--top_k", type=int, default=8, help="top-k of sampled decoding.")
    command.set_defaults(func=cfg_table)
    command = sub.add_parser("guidance", parents=[common], help=choose_guidance.__doc__)
    command.add_argument("--model_path", required=True, help="The trained UniMM model (finetune output).")
    command.add_argument("--visual_tokenizer_path", *_ALIASES["--visual_tokenizer_path"], required=True,
                         help="Its visual tokenizer.")
    command.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                         help="Guidance scales to choose from (1 = none).")
    command.add_argument("--samples", type=int, default=4, help="Sampled images per validation caption (0 = greedy "
                                                                "only).")
    command.add_argument("--top_k", type=int, default=8, help="top-k of sampled decoding.")
    command.add_argument("--default", type=float, default=1.0, help="The scale kept when there are no validation "
                                                                    "captions.")
    command.add_argument("--scale", type=float, default=None,
                         help="Decode at this scale (the recipe's) instead of choosing one on the validation captions.")
    command.set_defaults(func=choose_guidance)
    command = sub.add_parser("judge", parents=[common], help=judge.__doc__)
    command.add_argument("--tokenizer", choices=sorted(TARGETS), default="dualtoken", help="The run's visual tokenizer.")
    command.add_argument("--elapsed", type=float, default=None, help="Seconds the whole run took (judged too).")
    command.set_defaults(func=judge)
    return parser
