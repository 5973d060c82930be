"""An embedded, procedurally generated dataset: one coloured shape per image on a light background.

Every sample is a pure function of `(seed, index)`, so a dataset of any size is reproduced exactly on any
machine without downloading anything. Each sample carries its attributes (colour, shape, position), a caption
("top left: a red circle") and a LLaVA-format conversation of short questions about the image. The
quickstart trains a tokenizer and an LLM on it; `describe_shape_image` (bottom of this module) reads the
attributes back from pixels (no learned parts), which is how `unimm.data.toy.shapes_eval` scores
reconstructed and generated images. `ShapeScenesDataset` draws two or more shapes per image, captioned by
joining their captions (training text only: the checker reads one shape).

`write_llava_json` and `write_image_text_jsonl` export a dataset to the on-disk formats the real readers and
scripts consume (LLaVA JSON + image files, image-text jsonl).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours far apart from each other and from the light backgrounds (RGB, 0-255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Quadrant names; the shape's centre lies in that quadrant of the image.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
POSITION_QUESTION = "Where is the shape?"
DESCRIBE_QUESTION = "Describe the image."
# Attribute name -> the question that asks for it (the answers are the bare attribute values).
QUESTIONS: dict[str, str] = {"colour": COLOUR_QUESTION, "shape": SHAPE_QUESTION, "position": POSITION_QUESTION}

_SUPERSAMPLE = 4  # shapes are drawn at 4x resolution and box-filtered down, for clean anti-aliased edges


@dataclass(frozen=True)
class Combination:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return make_caption(self.colour, self.shape, self.position)


def make_caption(colour: str, shape: str, position: str) -> str:
    """The one caption template: "top left: a red circle". The position comes first: under causal attention the
    position words' hidden states then do not depend on the colour and shape words, so the image can be placed
    from them alone. With the position last ("a red circle at the top left") a tiny LLM placed held-out
    colour+shape+position captions in a quadrant it had memorised for the pair (benchmarks/results/quickstart.md)."""
    return f"{position}: a {colour} {shape}"


def all_combinations(
    colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES, positions: Sequence[str] = POSITIONS
) -> list[Combination]:
    for name, values, valid in (("colour", colours, COLOURS), ("shape", shapes, SHAPES),
                                ("position", positions, POSITIONS)):
        unknown = [v for v in values if v not in valid]
        if unknown or not values:
            raise ValueError(f"invalid {name} value(s) {unknown or list(values)}; valid: {list(valid)}")
    return [Combination(c, s, p) for c, s, p in itertools.product(colours, shapes, positions)]


def split_combinations(
    num_held_out: int, seed: int = 0, combinations: Sequence[Combination] | None = None
) -> tuple[list[Combination], list[Combination]]:
    """Split the attribute combinations into (train, held_out), chosen by `seed` such that every colour, shape
    and position value still occurs in the training combinations.

    Held-out combinations are spread out: while there are enough colour+shape pairs, each pair loses at most one
    position, and the positions are held out equally often (12 of the 72 default combinations: 12 of the 18 pairs
    lose one position each, every position is held out 3 times and still seen with 15 pairs). Beyond one per
    pair, the pairs lose a second position in the same way, then a third (the quickstart's 24: every pair loses
    one position, 6 pairs a second, each position held out 6 times); combinations are skipped where the training
    combinations would lose a colour, shape or position."""
    combinations = list(combinations if combinations is not None else all_combinations())
    if not 0 <= num_held_out < len(combinations):
        raise ValueError(f"num_held_out must be in [0, {len(combinations)}), got {num_held_out}")
    rng = np.random.default_rng(seed)
    pairs = sorted({(c.colour, c.shape) for c in combinations})
    positions = sorted({c.position for c in combinations}, key=POSITIONS.index)
    pair_order = [pairs[i] for i in rng.permutation(len(pairs))]
    position_order = [positions[i] for i in rng.permutation(len(positions))]
    available = set(combinations)
    # Preferred candidates first, in rounds: one position per pair in each round (positions in turn, a round
    # starting half-way round the positions from the last, so they stay held out equally often), every pair losing
    # r positions before any loses r + 1; then every other combination in seeded order.
    preferred: list[Combination] = []
    chosen = set()
    num_positions = len(position_order)
    for round_ in range(num_positions):
        for k, (colour, shape) in enumerate(pair_order):
            for j in range(num_positions):
                position = position_order[(k + round_ * (num_positions // 2) + j) % num_positions]
                combo = Combination(colour, shape, position)
                if combo in available and combo not in chosen:
                    preferred.append(combo)
                    chosen.add(combo)
                    break
    rest = [combinations[i] for i in rng.permutation(len(combinations))]
    held_out: list[Combination] = []
    train = list(combinations)
    for combo in preferred + [c for c in rest if c not in chosen]:
        if len(held_out) == num_held_out:
            break
        remaining = [c for c in train if c != combo]
        if all(any(getattr(c, a) == getattr(combo, a) for c in remaining) for a in ("colour", "shape", "position")):
            held_out.append(combo)
            train = remaining
    if len(held_out) < num_held_out:
        raise ValueError(f"cannot hold out {num_held_out} combinations and still cover every attribute value")
    key = {c: i for i, c in enumerate(combinations)}
    return sorted(train, key=key.__getitem__), sorted(held_out, key=key.__getitem__)


@dataclass
class ShapesConfig:
    """How images are drawn. The defaults give 32 px images whose shapes a 4x4-patch tokenizer can keep."""

    image_size: int = field(default=32, metadata={"help": "Side of the square images in pixels."})
    size_range: tuple[float, float] = field(
        default=(0.34, 0.42), metadata={"help": "Range of the shape's extent as a fraction of the image side."}
    )
    position_jitter: float = field(
        default=0.03, metadata={"help": "Max offset of the shape centre from its quadrant centre (fraction of side)."}
    )
    colour_jitter: int = field(default=12, metadata={"help": "Max per-channel jitter of the shape colour (0-255)."})
    background_range: tuple[int, int] = field(
        default=(215, 250), metadata={"help": "Per-channel range of the uniform light background colour (0-255)."}
    )
    noise_std: float = field(default=0.0, metadata={"help": "Std of Gaussian pixel noise added to the image (0-255)."})

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        low, high = self.size_range
        if not 0.05 <= low <= high <= 0.45:
            raise ValueError(f"size_range must satisfy 0.05 <= low <= high <= 0.45, got {self.size_range}")
        if not 0.0 <= self.position_jitter <= 0.1:
            raise ValueError(f"position_jitter must be in [0, 0.1], got {self.position_jitter}")
        bg_low, bg_high = self.background_range
        if not 150 <= bg_low <= bg_high <= 255:
            raise ValueError(f"background_range must satisfy 150 <= low <= high <= 255, got {self.background_range}")


@dataclass
class ShapeSample:
    """One generated image with everything known about it."""

    id: str
    image: Image.Image
    colour: str
    shape: str
    position: str
    caption: str
    # LLaVA format: [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": "..."}, ...]
    conversations: list[dict[str, str]]

    @property
    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "position": self.position}

    @property
    def qa_pairs(self) -> list[tuple[str, str]]:
        """(question, exact answer) for each attribute question."""
        return [(QUESTIONS[a], v) for a, v in self.attributes.items()]


def _triangle_points(cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    # Upright isosceles triangle whose bounding box (extent x 0.9 extent) is centred on (cx, cy).
    half_h = 0.45 * extent
    return [(cx, cy - half_h), (cx + extent / 2, cy + half_h), (cx - extent / 2, cy + half_h)]


def render_shape(
    colour: str | tuple[int, int, int],
    shape: str,
    position: str,
    image_size: int = 32,
    extent: float = 0.34,
    offset: tuple[float, float] = (0.0, 0.0),
    background: tuple[int, int, int] = (240, 240, 240),
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Draw one shape. `extent` and `offset` are fractions of the image side; `position` names the quadrant
    whose centre the shape is drawn around (plus `offset`)."""
    return render_shapes([(colour, shape, position, extent, offset)], image_size, background, noise_std, rng)


# One shape to draw: (colour name or RGB, shape, position, extent, offset), as `render_shape` takes them.
ShapeToDraw = tuple[Union[str, tuple[int, int, int]], str, str, float, tuple[float, float]]


def render_shapes(
    shapes: Sequence[ShapeToDraw],
    image_size: int = 32,
    background: tuple[int, int, int] = (240, 240, 240),
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Image.Image:
    """Draw several shapes on one background (in order; shapes in different quadrants do not overlap at the
    default extents)."""
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for colour, shape, position, extent, offset in shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}; valid: {list(POSITIONS)}")
        rgb = COLOURS[colour] if isinstance(colour, str) else tuple(int(v) for v in colour)
        cx = (0.25 if position.endswith("left") else 0.75) + offset[0]
        cy = (0.25 if position.startswith("top") else 0.75) + offset[1]
        cx, cy, size = cx * big, cy * big, extent * big
        if shape == "circle":
            draw.ellipse((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), fill=rgb)
        elif shape == "square":
            side = 0.85 * size  # a square looks larger than a circle of the same extent
            draw.rectangle((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), fill=rgb)
        else:
            draw.polygon(_triangle_points(cx, cy, size), fill=rgb)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if noise_std > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        array = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise_std, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    return image


def make_conversation(colour: str, shape: str, position: str, rng: np.random.Generator,
                      include_description: bool = True) -> list[dict[str, str]]:
    """A multi-turn LLaVA conversation asking each attribute question once (in a random order, so no answer
    depends on its turn), optionally followed by a request for the caption. `<image>` opens the first turn."""
    answers = {"colour": colour, "shape": shape, "position": position}
    turns = [(QUESTIONS[a], answers[a]) for a in rng.permutation(list(QUESTIONS))]
    if include_description:
        turns.append((DESCRIBE_QUESTION, make_caption(colour, shape, position)))
    conversation: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


class _GeneratedDataset:
    """`num_samples` samples made on demand by `_sample(index)`; indexing and iteration shared by the datasets below."""

    num_samples: int

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator:
        for i in range(self.num_samples):
            yield self[i]

    def __getitem__(self, index: int):
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return self._sample(index)

    def _sample(self, index: int):
        raise NotImplementedError


class ShapesDataset(_GeneratedDataset):
    """`num_samples` generated samples; sample `i` depends only on `(seed, i)` and the config.

    Samples cycle through `combinations` (default: every colour x shape x position) in a seeded order, so every
    combination occurs `num_samples / len(combinations)` times, +-1. Use different seeds for train and test
    images, and `split_combinations` to hold out whole prompts.
    """

    def __init__(self, num_samples: int, seed: int = 0, config: ShapesConfig | None = None,
                 combinations: Sequence[Combination] | None = None, id_prefix: str = "shapes",
                 include_description: bool = True) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.config = config or ShapesConfig()
        self.combinations = list(combinations) if combinations is not None else all_combinations()
        if not self.combinations:
            raise ValueError("ShapesDataset needs at least one combination")
        self.id_prefix = id_prefix
        self.include_description = include_description
        self._order = np.random.default_rng([seed, 0x5EED]).permutation(len(self.combinations))

    def _sample(self, index: int) -> ShapeSample:
        cfg = self.config
        combo = self.combinations[self._order[index % len(self.combinations)]]
        rng = np.random.default_rng([self.seed, index])
        extent = rng.uniform(*cfg.size_range)
        offset = tuple(rng.uniform(-cfg.position_jitter, cfg.position_jitter, 2))
        base = np.array(COLOURS[combo.colour])
        rgb = tuple(np.clip(base + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3), 0, 255))
        background = tuple(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1, 3))
        image = render_shape(rgb, combo.shape, combo.position, cfg.image_size, extent, offset, background,
                             cfg.noise_std, rng)
        return ShapeSample(
            id=f"{self.id_prefix}-{self.seed}-{index:06d}",
            image=image,
            colour=combo.colour,
            shape=combo.shape,
            position=combo.position,
            caption=combo.caption,
            conversations=make_conversation(combo.colour, combo.shape, combo.position, rng,
                                            self.include_description),
        )


def make_scene_caption(objects: Sequence[Combination]) -> str:
    """The caption of an image of several shapes: theirs, joined ("top left: a red circle, bottom right: a blue
    square")."""
    return ", ".join(c.caption for c in objects)


@dataclass
class SceneSample:
    """One generated image of several shapes, each one of the dataset's combinations."""

    id: str
    image: Image.Image
    objects: tuple[Combination, ...]  # in caption order
    caption: str

    @property
    def attributes(self) -> dict[str, list[dict[str, str]]]:
        return {"objects": [{"colour": c.colour, "shape": c.shape, "position": c.position} for c in self.objects]}


class ShapeScenesDataset(_GeneratedDataset):
    """`num_samples` images of `objects_per_image` shapes each, in different quadrants, with distinct colour+shape
    pairs, every shape one of `combinations` at its position (so scenes built from training combinations never
    draw a held-out one). The caption names the shapes in a random order, so which pair sits where is told only by
    the position words in front of it. Sample `i` depends only on `(seed, i)` and the config."""

    def __init__(self, num_samples: int, seed: int = 0, config: ShapesConfig | None = None,
                 combinations: Sequence[Combination] | None = None, objects_per_image: int = 2,
                 id_prefix: str = "scene") -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.combinations = list(combinations) if combinations is not None else all_combinations()
        self.by_position = {p: [c for c in self.combinations if c.position == p] for p in POSITIONS
                            if any(c.position == p for c in self.combinations)}
        if not 2 <= objects_per_image <= len(self.by_position):
            raise ValueError(f"objects_per_image must be in [2, {len(self.by_position)}] (positions with a "
                             f"combination), got {objects_per_image}")
        self.num_samples, self.seed, self.objects_per_image = num_samples, seed, objects_per_image
        self.config = config or ShapesConfig()
        self.id_prefix = id_prefix

    def _sample(self, index: int) -> SceneSample:
        cfg = self.config
        rng = np.random.default_rng([self.seed, 0x5CE7E, index])
        positions = list(self.by_position)
        objects: list[Combination] = []
        for k in rng.permutation(len(positions))[: self.objects_per_image]:
            pairs = {(c.colour, c.shape) for c in objects}
            choices = [c for c in self.by_position[positions[k]] if (c.colour, c.shape) not in pairs]
            if not choices:
                raise ValueError(f"no combination at {positions[k]!r} with a colour+shape not already in the scene")
            objects.append(choices[int(rng.integers(len(choices)))])
        shapes = []
        for combo in objects:
            extent = rng.uniform(*cfg.size_range)
            offset = tuple(rng.uniform(-cfg.position_jitter, cfg.position_jitter, 2))
            base = np.array(COLOURS[combo.colour])
            rgb = tuple(np.clip(base + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, 3), 0, 255))
            shapes.append((rgb, combo.shape, combo.position, extent, offset))
        background = tuple(rng.integers(cfg.background_range[0], cfg.background_range[1] + 1, 3))
        image = render_shapes(shapes, cfg.image_size, background, cfg.noise_std, rng)
        return SceneSample(id=f"{self.id_prefix}-{self.seed}-{index:06d}", image=image, objects=tuple(objects),
                           caption=make_scene_caption(objects))


def _save_images(dataset: ShapesDataset, out_dir: Path, image_dir: str) -> list[tuple[ShapeSample, str]]:
    (out_dir / image_dir).mkdir(parents=True, exist_ok=True)
    saved = []
    for sample in dataset:
        relative = f"{image_dir}/{sample.id}.png"
        sample.image.save(out_dir / relative)
        saved.append((sample, relative))
    return saved


def write_llava_json(dataset: ShapesDataset, out_dir: str | Path, json_name: str = "llava.json",
                     image_dir: str = "images") -> Path:
    """Write `dataset` as LLaVA JSON (`id`, `image` relative to `out_dir`, `conversations`) plus PNG files
    under `out_dir/image_dir`. Returns the JSON path; the image folder to pass to readers is `out_dir`."""
    out_dir = Path(out_dir)
    records = [
        {"id": sample.id, "image": relative, "conversations": sample.conversations}
        for sample, relative in _save_images(dataset, out_dir, image_dir)
    ]
    path = out_dir / json_name
    path.write_text(json.dumps(records, indent=1))
    return path


def write_image_text_jsonl(dataset: ShapesDataset | ShapeScenesDataset, out_dir: str | Path,
                           jsonl_name: str = "captions.jsonl", image_dir: str = "images", text_key: str = "text",
                           image_key: str = "image", append: bool = False) -> Path:
    """Write `dataset` as image-text pairs: one JSON object per line with `id`, `image_key` (path relative to
    `out_dir`), `text_key` (the caption) and the attributes; PNG files under `out_dir/image_dir`. `append` adds
    the lines to an existing file (e.g. scenes after single shapes)."""
    out_dir = Path(out_dir)
    path = out_dir / jsonl_name
    with path.open("a" if append else "w") as f:
        for sample, relative in _save_images(dataset, out_dir, image_dir):
            record = {"id": sample.id, image_key: relative, text_key: sample.caption, **sample.attributes}
            f.write(json.dumps(record) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------
# Pixel-level checker: reads (colour, shape, position) back from an image, with no learned parts.


@dataclass(frozen=True)
class ShapeDescription:
    """What `describe_shape_image` read from the pixels; fields are None when no shape was found."""

    colour: str | None
    shape: str | None
    position: str | None

    def matches(self, colour: str, shape: str, position: str | None = None) -> bool:
        """True when colour and shape (and, if given, position) agree."""
        ok = self.colour == colour and self.shape == shape
        return ok and (position is None or self.position == position)

    def __iter__(self) -> Iterator[str | None]:
        return iter((self.colour, self.shape, self.position))


_NOTHING = ShapeDescription(None, None, None)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (small images: a plain flood fill is enough)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    centre_y, centre_x = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    # An upright triangle holds a quarter of its area above its bounding box's middle; circles and squares half.
    top_fraction = ((ys < centre_y).sum() + 0.5 * (ys == centre_y).sum()) / len(ys)
    if top_fraction < 0.42:
        return "triangle"
    # A square fills its bounding box and reaches out along the diagonals (L1 radius = 2x the Linf radius);
    # a circle fills ~0.79 of its box and its L1 radius is ~1.41x. Thresholds measured under blur.
    dy, dx = np.abs(ys - centre_y) + 0.5, np.abs(xs - centre_x) + 0.5
    diagonal_reach = (dx + dy).max() / np.maximum(dx, dy).max()
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill + 0.5 * diagonal_reach > 1.76 else "circle"


def describe_shape_image(image: Image.Image | np.ndarray, min_area_fraction: float = 0.01) -> ShapeDescription:
    """Read (colour, shape, position) from an image of one shape on a plain background.

    Background colour = median of the border pixels; the foreground colour is estimated from the pixels that
    differ most from it, and each pixel is assigned to whichever of the two it is nearer (robust to blur);
    the largest connected foreground region is the shape. Colour = nearest palette colour to its median;
    shape from how much of it lies above its middle (triangle) and how it fills its bounding box and reaches
    along the diagonals (square vs circle);
    position = quadrant of its centroid. Returns all-None when no region covers `min_area_fraction` of the image.
    """
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"describe_shape_image expects an RGB image [H, W, 3], got shape {array.shape}")
    height, width, _ = array.shape
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    background = np.median(border, axis=0)
    distance_bg = np.linalg.norm(array - background, axis=-1)
    strong = distance_bg > max(60.0, np.percentile(distance_bg, 90) * 0.5)
    if strong.sum() < max(1, min_area_fraction * height * width * 0.25):
        return _NOTHING
    foreground = np.median(array[strong], axis=0)
    distance_fg = np.linalg.norm(array - foreground, axis=-1)
    mask = _largest_component(distance_fg < distance_bg)
    if mask.sum() < min_area_fraction * height * width:
        return _NOTHING
    palette_names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in palette_names], dtype=np.float64)
    shape_colour = np.median(array[mask], axis=0)
    colour = palette_names[int(np.linalg.norm(palette - shape_colour, axis=-1).argmin())]
    ys, xs = np.nonzero(mask)
    vertical = "top" if ys.mean() + 0.5 < height / 2 else "bottom"
    horizontal = "left" if xs.mean() + 0.5 < width / 2 else "right"
    return ShapeDescription(colour, _classify_shape(mask), f"{vertical} {horizontal}")
