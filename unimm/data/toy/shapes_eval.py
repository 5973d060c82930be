"""Scoring on the shapes data with the pixel checker: how well a tokenizer's reconstructions keep the shapes, how
many generated images show what their prompt asked for, and exact-match question answering.

The checker (`unimm.data.toy.shapes.describe_shape_image`) has no learned parts, so these scores measure the model,
not another model's opinion of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from unimm.data.toy.shapes import ShapeDescription, ShapesDataset, describe_shape_image


@dataclass
class CheckerScores:
    """Fractions of images whose colour / shape / position the checker confirms; `accuracy` needs colour, shape
    and position all right, `colour_and_shape` only the first two."""

    accuracy: float
    colour_and_shape: float
    colour: float
    shape: float
    position: float
    num_images: int

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def score_images(images: Sequence[Image.Image], expected: Sequence[tuple[str, str, str]]) -> CheckerScores:
    """Checker scores of `images` against the `(colour, shape, position)` each should show."""
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images but {len(expected)} expected attribute triples")
    if not images:
        raise ValueError("score_images needs at least one image")
    found: list[ShapeDescription] = [describe_shape_image(image) for image in images]
    count = len(images)

    def fraction(hits: list[bool]) -> float:
        return sum(hits) / count

    return CheckerScores(
        accuracy=fraction([f.matches(*e) for f, e in zip(found, expected)]),
        colour_and_shape=fraction([f.matches(e[0], e[1]) for f, e in zip(found, expected)]),
        colour=fraction([f.colour == e[0] for f, e in zip(found, expected)]),
        shape=fraction([f.shape == e[1] for f, e in zip(found, expected)]),
        position=fraction([f.position == e[2] for f, e in zip(found, expected)]),
        num_images=count,
    )


@torch.no_grad()
def reconstruct(visual_tokenizer, images: Sequence[Image.Image], batch_size: int = 64) -> list[Image.Image]:
    """`decode(encode(x))` through a UniMM tokenizer (eval mode), as PIL images."""
    was_training = visual_tokenizer.training
    visual_tokenizer.eval()
    device = next(visual_tokenizer.parameters()).device
    out: list[Image.Image] = []
    try:
        for start in range(0, len(images), batch_size):
            pixel_values = visual_tokenizer.preprocess(list(images[start:start + batch_size])).to(device)
            out.extend(visual_tokenizer.postprocess(visual_tokenizer.decode(visual_tokenizer.encode(pixel_values))))
    finally:
        visual_tokenizer.train(was_training)
    return out


def reconstruction_scores(visual_tokenizer, dataset: ShapesDataset, batch_size: int = 64) -> CheckerScores:
    """Checker scores on the tokenizer's reconstructions of `dataset` (use held-out seeds)."""
    samples = list(dataset)
    reconstructions = reconstruct(visual_tokenizer, [s.image for s in samples], batch_size)
    return score_images(reconstructions, [(s.colour, s.shape, s.position) for s in samples])


def normalise_answer(text: str) -> str:
    """Lower-case, trimmed, without a trailing full stop: "Red." and "red" are the same answer."""
    return text.strip().lower().rstrip(".").strip()


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after `normalise_answer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match needs at least one answer")
    return sum(normalise_answer(p) == normalise_answer(a) for p, a in zip(predictions, answers)) / len(answers)
