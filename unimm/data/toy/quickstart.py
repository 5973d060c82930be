"""The quickstart's data (`scripts/quickstart.sh`, run by `unimm-quickstart-eval prepare`): the shapes training and
held-out sets with the files every later step reads, the generation prompts with the held-out captions first, and
the readers the scoring steps use. The program around it (options, the tiny LLM, scoring) is `unimm.cli.quickstart`.

Layout under `<out>/data`: `train/` (`llava.json`, `captions.jsonl`, images, optionally `captions_llava.json`),
`test/` (`llava.json`, `qa.yaml` for chat, `qa_answers.json`), `prompts.txt`, `held_out_prompts.json`,
`validation_prompts.json`.

The held-out captions (the test, reported once) are kept out of every training file. A validation split of the
seen captions (trained on like the others) is where a run may choose settings such as the guidance scale
(`quickstart.sh --guidance validation`, the VQRAE default), never on the held-out ones; the seen-caption generation
figure is reported on the other seen captions. (Taking the validation
captions out of training as well cost held-out accuracy: 72 combinations less 30 leave too few to generalise from,
benchmarks/results/quickstart.md.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unimm.data.toy.shapes import (
    DESCRIBE_QUESTION,
    QUESTIONS,
    ShapeScenesDataset,
    ShapesConfig,
    ShapesDataset,
    all_combinations,
    split_combinations,
    write_image_text_jsonl,
    write_llava_json,
)

__all__ = [
    "CAPTION_CONVERSATIONS",
    "PARTIAL_CAPTIONS",
    "TEST_SEED",
    "QuickstartData",
    "caption_attributes",
    "held_out_captions",
    "text_corpus",
    "validation_captions",
    "write_quickstart_data",
]

TEST_SEED = 1000  # held-out images use seeds far from the training seed
CAPTION_CONVERSATIONS = "captions_llava.json"  # written by `prepare --caption_conversations true`


PARTIAL_CAPTIONS = {"position": lambda s: s.position, "pair": lambda s: f"a {s.colour} {s.shape}"}


def add_partial_captions(path: Path, dataset: ShapesDataset, fraction: float, kinds: Sequence[str]) -> None:
    """Append records that name only some attributes of a training image, for `fraction` of the images (the same
    image files), the `kinds` in turn: `position` ("top left") or `pair` (colour and shape: "a red circle"). In
    text-to-image training the position words alone must then place the shape (and the colour and shape words
    alone draw it), so the full captions are learnt as separable parts."""
    step = 1.0 / fraction
    with path.open("a") as f:
        for k in range(int(len(dataset) * fraction)):
            sample = dataset[int(k * step)]
            text = PARTIAL_CAPTIONS[kinds[k % len(kinds)]](sample)
            record = {"id": f"{sample.id}-part", "image": f"images/{sample.id}.png", "text": text,
                      **sample.attributes}
            f.write(json.dumps(record) + "\n")


def write_caption_conversations(captions: Path, path: Path) -> None:
    """The image-text pairs of `captions` (captions.jsonl) as one-turn LLaVA conversations ("Describe the image." ->
    the caption, the same image files), LLaVA's caption-alignment format: pretraining reads understanding samples
    from pixels (VQRAE's encode_features and the feature projector) only through conversations, while text-to-image
    reads codes."""
    rows = [json.loads(line) for line in captions.read_text().split("\n") if line]
    records = [{"id": f"{row['id']}-caption", "image": row["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{DESCRIBE_QUESTION}"}, {"from": "gpt", "value": row["text"]}]}
        for row in rows]
    path.write_text(json.dumps(records, indent=1))


@dataclass(frozen=True)
class QuickstartData:
    """What `write_quickstart_data` wrote: counts for the summary line."""

    num_train: int
    num_test: int
    num_prompts: int
    num_held_out_prompts: int
    num_held_out: int
    num_validation: int = 0


def write_quickstart_data(out: str | Path, config: ShapesConfig, seed: int = 0, train_samples: int = 2048,
                          test_samples: int = 72, held_out_prompts: int = 24, num_prompts: int = 72,
                          partial_captions: float = 0.0, partial_caption_kinds: Sequence[str] = ("position",),
                          scenes: float = 0.0, caption_conversations: bool = False,
                          validation_prompts: int = 0) -> QuickstartData:
    """Shapes data under `<out>/data` (train: LLaVA JSON + captions jsonl; test: LLaVA JSON, QA chat config and
    answers; generation prompts). `held_out_prompts` attribute combinations never appear in a training file;
    `validation_prompts` of the trained ones (spread over the colour+shape pairs like the held-out ones) form the
    validation split, apart from the seen-caption prompts."""
    out = Path(out)
    train_combos, held_out = split_combinations(held_out_prompts, seed=seed)
    validation: list = []
    if validation_prompts:
        validation = split_combinations(validation_prompts, seed=seed + 1, combinations=train_combos)[1]
    train = ShapesDataset(train_samples, seed=seed, config=config, combinations=train_combos, id_prefix="train")
    write_llava_json(train, out / "data" / "train", "llava.json")
    captions = write_image_text_jsonl(train, out / "data" / "train", "captions.jsonl")
    if caption_conversations:  # before partial captions are appended: one conversation per training image
        write_caption_conversations(captions, out / "data" / "train" / CAPTION_CONVERSATIONS)
    if partial_captions > 0:
        add_partial_captions(captions, train, partial_captions, list(partial_caption_kinds))
    if scenes > 0:  # two-shape images, only from training combinations (text-to-image and caption records)
        scene_set = ShapeScenesDataset(int(train_samples * scenes), seed=seed, config=config,
                                       combinations=train_combos, id_prefix="train-scene")
        write_image_text_jsonl(scene_set, out / "data" / "train", "captions.jsonl", append=True)
    # Held-out images for QA and tokenizer fidelity: new seed, every combination.
    test = ShapesDataset(test_samples, seed=TEST_SEED + seed, config=config, id_prefix="test")
    write_llava_json(test, out / "data" / "test", "llava.json")
    images, questions, answers = [], [], []
    for sample in test:
        for attribute, question in QUESTIONS.items():
            images.append(str((out / "data" / "test" / "images" / f"{sample.id}.png").resolve()))
            questions.append(question)
            answers.append(sample.attributes[attribute])
    (out / "data" / "test" / "qa.yaml").write_text(json.dumps({"images": images, "questions": questions}))
    (out / "data" / "test" / "qa_answers.json").write_text(json.dumps(answers))
    # Generation prompts: the held-out combinations (never seen in training) first, then seen ones. Fewer prompts
    # than combinations (--fast): up to half held out, the seen ones spread over the combinations.
    held = [c.caption for c in held_out]
    seen = [c.caption for c in train_combos if c not in validation]
    if num_prompts < len(held) + len(seen):
        held = held[: max(num_prompts - len(seen), (num_prompts + 1) // 2 if seen else num_prompts)]
        wanted = num_prompts - len(held)
        seen = [seen[i * len(seen) // wanted] for i in range(wanted)] if wanted else []
    prompts = held + seen
    (out / "data" / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (out / "data" / "held_out_prompts.json").write_text(json.dumps([c.caption for c in held_out]))
    (out / "data" / "validation_prompts.json").write_text(json.dumps([c.caption for c in validation]))
    return QuickstartData(len(train), len(test), len(prompts), len(held), len(held_out), len(validation))


def text_corpus() -> list[str]:
    """Every text the quickstart's models read: the captions, the questions and the describe prompt (what its tiny
    BPE text tokenizer is trained on)."""
    return [c.caption for c in all_combinations()] + list(QUESTIONS.values()) + [DESCRIBE_QUESTION]


def caption_attributes() -> dict[str, tuple[str, str, str]]:
    """Caption -> (colour, shape, position), for every attribute combination."""
    return {c.caption: (c.colour, c.shape, c.position) for c in all_combinations()}


def held_out_captions(out: str | Path) -> set[str]:
    """The captions `write_quickstart_data` kept out of every training file."""
    return set(json.loads((Path(out) / "data" / "held_out_prompts.json").read_text()))


def validation_captions(out: str | Path) -> list[str]:
    """The validation split of the seen captions `write_quickstart_data` wrote, in its order; none for a run
    directory written before the split existed."""
    path = Path(out) / "data" / "validation_prompts.json"
    return json.loads(path.read_text()) if path.is_file() else []
