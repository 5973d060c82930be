"""The one sequence builder: typed segments -> `input_ids`, `labels`, visual codes and image spans.

Every sample (caption, text-to-image, conversation, text) is described as a list of segments; labels come from
each segment's `supervise` flag at the moment its ids are produced, so they are never recovered afterwards by
re-tokenising text (the LLaVA "tokenization mismatch" failure). Image slots follow `unimm.llm.layout`:
`<|boi|> v_1 .. v_N <|eoi|>`, where each v_i holds `image_token_id` (or, in flat mode, the code's token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from unimm.llm.layout import IGNORE_INDEX, VocabLayout, encode_plain_text


class SampleError(ValueError):
    """A record cannot become a training sample; the message starts with the sample id. Datasets skip and count
    these (see `BadSampleTracker`)."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class MalformedRecordError(SampleError):
    """The record's fields are missing or inconsistent (no conversations, `<image>` count mismatch, ...)."""


class SampleTooLongError(SampleError):
    """The sample does not fit `max_length` without cutting an image span (or nothing supervised would remain)."""


@dataclass(frozen=True)
class Text:
    """Text tokenised without BOS/EOS. `special=False` (user/data text) keeps strings such as `<|boi|>` or
    `<|im_end|>` plain text; `special=True` is for template scaffolding whose control tokens must be parsed."""

    text: str
    supervise: bool = False
    special: bool = False


@dataclass(frozen=True)
class TokenIds:
    """Raw token ids (BOS, EOS, a `t2i_prefix_ids` prefix)."""

    ids: tuple[int, ...]
    supervise: bool = False

    def __init__(self, ids: Sequence[int], supervise: bool = False):
        object.__setattr__(self, "ids", tuple(int(i) for i in ids))
        object.__setattr__(self, "supervise", supervise)


@dataclass
class ImageSlot:
    """One image span. Either discrete `codes` (group -> LongTensor [N, D]) or continuous input: `num_positions`
    positions later filled from `image_features` (precomputed `features` [N, C], or `pixel_values` [3, H, W]
    that the training step encodes). `supervise=True` (text-to-image) makes the codes and `<|eoi|>` targets.
    `include_boi=False` when the previous segment already ends with `<|boi|>` (a `t2i_prefix_ids` prefix)."""

    codes: dict[str, torch.Tensor] | None = None
    num_positions: int | None = None
    features: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    supervise: bool = False
    include_boi: bool = True
    image_key: str | None = None  # where the image came from (path or cache key), for inspection and errors

    @property
    def length(self) -> int:
        if self.codes is not None:
            return int(next(iter(self.codes.values())).shape[0])
        if self.features is not None:
            return int(self.features.shape[0])
        return int(self.num_positions or 0)


Segment = Text | TokenIds | ImageSlot


@dataclass
class Sample:
    """One built training sample (1-D tensors of length L)."""

    sample_id: str
    task: str
    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], IGNORE_INDEX where not supervised
    visual_codes: dict[str, torch.Tensor] | None  # group -> [L, D], -1 off code positions; None in flat mode
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each slot's positions
    image_features: list[torch.Tensor] = field(default_factory=list)  # per continuous slot: [N, C]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per continuous slot: [3, H, W]
    image_keys: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def has_images(self) -> bool:
        return bool(self.image_spans)


# Probes for continuation tokenisation: a newline is a byte piece in LLaMA/Mistral vocabularies and never merges
# with the text after it there; the others serve vocabularies with multi-newline pieces.
_PROBES = ("\n", "\u2603", "\u0001")


def attach_boundary_spaces(segments: Sequence[Segment]) -> list[Segment]:
    """Moves one space that ends a text segment onto the user/data text segment after it (which then starts with it),
    so the word-boundary space is tokenised with the word it precedes, as in one-string tokenisation: SentencePiece
    `▁Give`, byte-level BPE `ĠGive`. Left where it was, it would become a lone space token followed by the word split
    as a mid-word continuation (`▁`, `G`, `ive`). The moved space takes the following segment's `supervise` flag."""
    out: list[Segment] = list(segments)
    for i in range(len(out) - 1):
        here, after = out[i], out[i + 1]
        if (isinstance(here, Text) and isinstance(after, Text) and not after.special and here.text.endswith(" ")
                and after.text and not after.text[0].isspace()):
            out[i] = Text(here.text[:-1], supervise=here.supervise, special=here.special)
            out[i + 1] = Text(" " + after.text, supervise=after.supervise, special=after.special)
    return [s for s in out if not (isinstance(s, Text) and s.text == "")]


@dataclass
class _Draft:
    """A sample being built: ids and labels so far, and per image slot its span, boundaries and inputs."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    code_parts: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)  # group -> (start, codes)
    spans: list[tuple[int, int]] = field(default_factory=list)  # visual positions of each slot
    boundaries: list[tuple[int, int]] = field(default_factory=list)  # image spans including <|boi|> and <|eoi|>
    continuous: list[tuple[str, torch.Tensor] | None] = field(default_factory=list)  # ("features"|"pixels", x)
    keys: list[str | None] = field(default_factory=list)

    def extend(self, ids: Sequence[int], supervise: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if supervise else [IGNORE_INDEX] * len(ids))


class SequenceBuilder:
    """Turns segments into a `Sample` for one tokenizer and vocabulary layout.

    `max_length`: longer samples are cut at the right when the cut falls in text; a cut through an image span
    (including its `<|boi|>`/`<|eoi|>`) raises `SampleTooLongError` so the sample is dropped and counted.
    """

    def __init__(self, text_tokenizer: PreTrainedTokenizerBase, layout: VocabLayout, max_length: int | None = None):
        self.text_tokenizer = text_tokenizer
        self.layout = layout
        self.max_length = max_length
        self.group_names = list(layout.codebook_spec)
        self._special_cache: dict[tuple[str, bool], list[int]] = {}
        self._probe_cache: dict[tuple[str, bool], list[int]] = {}
        self.marks_text_start = self._detect_text_start_mark()
        self.marks_text_after_special = self._detect_mark_after_special()
        # what `_ends_with_special` looks for, gathered only where it is asked
        self._special_ids: set[int] = set()
        self._special_strings: tuple[str, ...] = ()
        if self.marks_text_after_special:
            self._special_ids = set(text_tokenizer.all_special_ids) | {layout.boi_token_id, layout.eoi_token_id}
            self._special_strings = tuple(t for t in text_tokenizer.all_special_tokens if t)

    def _detect_text_start_mark(self) -> bool:
        """Whether the tokenizer marks the start of every call's text (SentencePiece's word-boundary `▁`, as in
        LLaMA and Mistral): then a segment that continues a sequence must not be tokenised on its own, or each
        segment gains a space the format never had (`[INST]  Give`)."""
        return self._encode_continuing(["a"], special=False)[0] != encode_plain_text(self.text_tokenizer, "a")

    def _detect_mark_after_special(self) -> bool:
        """Whether the tokenizer also marks the start of text that follows a special token, as it marks a call's
        start: SentencePiece-kind tokenizers split the text at special tokens and, with legacy pre-tokenisation
        (Metaspace `prepend_scheme="always"`), give each piece its own `▁` (`</s>▁What`); transformers' default
        (`"first"`) continues it (`</s>What`). Text after an EOS or an image span (which ends with the special
        `<|eoi|>`) is tokenised as the tokenizer does it there, so built ids equal one-call tokenisation of the
        format's text with each image span written as special tokens."""
        marker = self.text_tokenizer.eos_token
        if not self.marks_text_start or not marker:
            return False
        marker_ids = self.text_tokenizer(marker, add_special_tokens=False)["input_ids"]
        ids = self.text_tokenizer(marker + "a", add_special_tokens=False)["input_ids"]
        return list(ids[: len(marker_ids)]) == list(marker_ids) and list(ids[len(marker_ids):]) == list(
            encode_plain_text(self.text_tokenizer, "a"))

    def _ends_with_special(self, segment: Segment) -> bool:
        """Whether a special token ends `segment` (an image span always ends with `<|eoi|>`)."""
        if isinstance(segment, ImageSlot):
            return True
        if isinstance(segment, TokenIds):
            return bool(segment.ids) and segment.ids[-1] in self._special_ids
        return segment.special and segment.text.endswith(self._special_strings)

    def _encode_continuing(self, texts: list[str], special: bool) -> list[list[int]]:
        """Ids of `texts` as they tokenise in the middle of a sequence: each is tokenised after a probe that takes
        the tokenizer's start-of-text mark, and the probe's ids are dropped. A probe whose ids change with the text
        after it (it merged) is not used for that text; the next one is."""
        kwargs = {"add_special_tokens": False, "split_special_tokens": not special}
        out: list[list[int] | None] = [None] * len(texts)
        for probe in _PROBES:
            todo = [i for i, ids in enumerate(out) if ids is None]
            if not todo:
                break
            probe_ids = self._probe_ids(probe, special)
            encoded = self.text_tokenizer([probe + texts[i] for i in todo], **kwargs)["input_ids"]
            for i, ids in zip(todo, encoded):
                if list(ids[: len(probe_ids)]) == probe_ids:
                    out[i] = list(ids[len(probe_ids):])
        failed = [texts[i][:40] for i, ids in enumerate(out) if ids is None]
        if failed:
            raise ValueError(f"cannot tokenise {failed[0]!r} as a continuation with "
                             f"{type(self.text_tokenizer).__name__}: every probe {list(_PROBES)} merges with it")
        return [ids for ids in out if ids is not None]

    def _probe_ids(self, probe: str, special: bool) -> list[int]:
        """A probe's own ids, tokenised once per builder (every continuing segment of every sample needs them)."""
        key = (probe, special)
        if key not in self._probe_cache:
            ids = self.text_tokenizer(probe, add_special_tokens=False, split_special_tokens=not special)["input_ids"]
            self._probe_cache[key] = list(ids)
        return self._probe_cache[key]

    def encode_text(self, segment: Text, continues: bool = False) -> list[int]:
        """Ids of one text segment; `continues=True` when text or an image precedes it in the same sequence."""
        continues = continues and self.marks_text_start
        if not segment.special:
            if continues:
                return self._encode_continuing([segment.text], special=False)[0]
            return encode_plain_text(self.text_tokenizer, segment.text)
        key = (segment.text, continues)
        if key not in self._special_cache:  # template scaffolding repeats; cache it
            if continues:
                ids = self._encode_continuing([segment.text], special=True)[0]
            else:
                ids = self.text_tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            self._special_cache[key] = ids
        return list(self._special_cache[key])

    def _continues(self, segments: Sequence[Segment]) -> list[bool]:
        """Per segment: whether text or an image precedes it in the same document, so its text continues a string
        rather than starting one. A BOS starts a new document (LLaMA-2 encodes each turn pair in its own call);
        text after a special token starts afresh where the tokenizer marks it so (`marks_text_after_special`)."""
        flags, started = [], False
        bos = self.text_tokenizer.bos_token_id
        for segment in segments:
            flags.append(started)
            if isinstance(segment, TokenIds) and bos is not None and segment.ids and segment.ids[-1] == bos:
                started = False
            elif self.marks_text_after_special and self._ends_with_special(segment):
                started = False
            elif not isinstance(segment, TokenIds):
                started = True
        return flags

    def _encode_plain_segments(self, segments: Sequence[Segment], continues: Sequence[bool]) -> list[list[int]]:
        """One batched tokenizer call for all user/data text of a sample (per-call overhead dominates for short
        segments); continuing segments go through the probe (see `encode_text`)."""
        fresh: list[tuple[int, str]] = []
        continuing: list[tuple[int, str]] = []
        plain = [(s, c) for s, c in zip(segments, continues) if isinstance(s, Text) and not s.special]
        for index, (segment, after_text) in enumerate(plain):
            (continuing if after_text and self.marks_text_start else fresh).append((index, segment.text))
        out: list[list[int]] = [[] for _ in plain]
        if fresh:
            encoded = self.text_tokenizer([t for _, t in fresh], add_special_tokens=False, split_special_tokens=True)
            for (index, _), ids in zip(fresh, encoded["input_ids"]):
                out[index] = list(ids)
        if continuing:
            encoded = self._encode_continuing([t for _, t in continuing], special=False)
            for (index, _), ids in zip(continuing, encoded):
                out[index] = ids
        return out

    def _check_codes(self, slot: ImageSlot, sample_id: str) -> int:
        codes = slot.codes
        assert codes is not None
        if list(codes) != self.group_names and sorted(codes) != sorted(self.group_names):
            raise SampleError(sample_id, f"image codes have groups {sorted(codes)}, the vocabulary layout expects "
                                         f"{self.group_names}")
        lengths = set()
        for name in self.group_names:
            group = codes[name]
            spec = self.layout.codebook_spec[name]
            if group.dim() != 2 or group.shape[1] != spec["depth"]:
                raise SampleError(sample_id, f"codes[{name!r}] must be [N, {spec['depth']}], got {list(group.shape)}")
            if group.numel() and (int(group.min()) < 0 or int(group.max()) >= spec["num_codes"]):
                raise SampleError(sample_id, f"codes[{name!r}] outside [0, {spec['num_codes']})")
            lengths.add(int(group.shape[0]))
        if len(lengths) != 1:
            raise SampleError(sample_id, f"codebook groups have different numbers of positions {sorted(lengths)}")
        return lengths.pop()

    def build(self, segments: Sequence[Segment], sample_id: str, task: str, require_supervision: bool = True) -> Sample:
        """`require_supervision=False` for inference prompts; training samples without a target raise.

        Three phases: lay the segments out as ids and labels (`_lay_out`), cut to `max_length` (`_truncate`), then
        turn the draft into tensors (`_assemble`)."""
        draft = self._lay_out(attach_boundary_spaces(segments), sample_id)
        self._truncate(draft, sample_id)
        return self._assemble(draft, sample_id, task, require_supervision)

    # ----------------------------------------------------------------------------------------- build phases
    def _lay_out(self, segments: list[Segment], sample_id: str) -> _Draft:
        """Every segment's ids with their labels, in order; image slots also record their span and inputs."""
        draft = _Draft(code_parts={name: [] for name in self.group_names})
        continues = self._continues(segments)
        plain_ids = iter(self._encode_plain_segments(segments, continues))
        for segment, after_text in zip(segments, continues):
            if isinstance(segment, Text):
                new = next(plain_ids) if not segment.special else self.encode_text(segment, continues=after_text)
                draft.extend(new, segment.supervise)
            elif isinstance(segment, TokenIds):
                draft.extend(segment.ids, segment.supervise)
            elif isinstance(segment, ImageSlot):
                self._lay_out_image(draft, segment, sample_id)
            else:
                raise TypeError(f"sample {sample_id}: unknown segment type {type(segment).__name__}")
        return draft

    def _lay_out_image(self, draft: _Draft, segment: ImageSlot, sample_id: str) -> None:
        """`[<|boi|>] v_1 .. v_N <|eoi|>`: the positions hold the codes' tokens (flat) or `image_token_id`, with the
        codes, continuous features or pixels recorded for the collator."""
        layout = self.layout
        span_start = len(draft.ids)
        if segment.include_boi:
            draft.extend([layout.boi_token_id], supervise=False)
        elif not draft.ids or draft.ids[-1] != layout.boi_token_id:
            raise SampleError(sample_id, "an image slot without its own <|boi|> must follow <|boi|>")
        start = len(draft.ids)
        continuous: tuple[str, torch.Tensor] | None = None
        if segment.codes is not None:
            count = self._check_codes(segment, sample_id)
            if layout.flat_codes:
                (group,) = self.group_names
                visual_ids = layout.code_to_token(segment.codes[group][:, 0]).tolist()
            else:
                visual_ids = [layout.image_token_id] * count
                for name in self.group_names:
                    draft.code_parts[name].append((start, segment.codes[name].long()))
        else:
            if segment.supervise:
                raise SampleError(sample_id, "a supervised (text-to-image) image slot needs codes")
            count = segment.length
            if count <= 0:
                raise SampleError(sample_id, "an image slot needs codes, features or num_positions")
            if segment.features is not None:
                continuous = ("features", segment.features)
            elif segment.pixel_values is not None:
                continuous = ("pixels", segment.pixel_values)
            visual_ids = [layout.image_token_id] * count
        draft.extend(visual_ids, segment.supervise)
        draft.spans.append((start, start + count))
        draft.ids.append(layout.eoi_token_id)
        draft.labels.append(layout.eoi_token_id if segment.supervise else IGNORE_INDEX)
        draft.boundaries.append((span_start if segment.include_boi else start - 1, len(draft.ids)))
        draft.continuous.append(continuous)
        draft.keys.append(segment.image_key)

    def _truncate(self, draft: _Draft, sample_id: str) -> None:
        """Cut at `max_length` when the cut falls in text; a cut through an image span raises."""
        if self.max_length is None or len(draft.ids) <= self.max_length:
            return
        cut = self.max_length
        inside = [b for b in draft.boundaries if b[0] < cut < b[1]]
        if inside:
            raise SampleTooLongError(sample_id, f"{len(draft.ids)} tokens exceed max_length {self.max_length} and "
                                                f"the cut at {cut} would split the image span {list(inside[0])}")
        draft.ids, draft.labels = draft.ids[:cut], draft.labels[:cut]
        num_kept = sum(1 for b in draft.boundaries if b[1] <= cut)
        draft.spans, draft.keys = draft.spans[:num_kept], draft.keys[:num_kept]
        draft.continuous = draft.continuous[:num_kept]
        for name in self.group_names:
            draft.code_parts[name] = [(s, c) for s, c in draft.code_parts[name] if s < cut]

    def _assemble(self, draft: _Draft, sample_id: str, task: str, require_supervision: bool) -> Sample:
        """The draft as tensors: ids, labels, the per-position code grid `[L, D]` of each group (-1 off images)."""
        input_ids = torch.tensor(draft.ids, dtype=torch.long)
        label_tensor = torch.tensor(draft.labels, dtype=torch.long)
        if require_supervision and not bool((label_tensor != IGNORE_INDEX).any()):
            cut = self.max_length is not None and len(draft.ids) == self.max_length
            raise (SampleTooLongError if cut else SampleError)(sample_id, "no supervised token (nothing to train on)")
        visual_codes = None
        if not self.layout.flat_codes and any(draft.code_parts.values()):
            visual_codes = {}
            for name in self.group_names:
                depth = self.layout.codebook_spec[name]["depth"]
                full = torch.full((len(draft.ids), depth), -1, dtype=torch.long)  # [L, D]
                for start, codes in draft.code_parts[name]:
                    full[start:start + codes.shape[0]] = codes
                visual_codes[name] = full
        features = [tensor for kind, tensor in filter(None, draft.continuous) if kind == "features"]
        pixels = [tensor for kind, tensor in filter(None, draft.continuous) if kind == "pixels"]
        return Sample(sample_id=sample_id, task=task, input_ids=input_ids, labels=label_tensor,
                      visual_codes=visual_codes, image_spans=draft.spans, image_features=features,
                      pixel_values=pixels, image_keys=draft.keys)

