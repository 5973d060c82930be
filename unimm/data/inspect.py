"""Show what the model will be trained on: for N samples of a data file, every token with whether it is a target,
and the image slots. The tool to reach for when the loss looks wrong.

    unimm-inspect-data --model runs/unimm-model --data llava.json --num_samples 3

`--model` is a directory with the (extended) text tokenizer and a UniMM `config.json` holding `vocab_layout`
(what `scripts/pretrain.py` / `extend_tokenizer_and_model` save). `--data` is a LLaVA JSON/jsonl file
(conversation samples), a code cache directory (caption or t2i samples, `--task`), or a text file.
Without a code cache, LLaVA image slots are shown with `--num_image_positions` placeholder positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from unimm.data.sequence import ImageSlot, Sample, SampleError
from unimm.llm.layout import IGNORE_INDEX, VocabLayout


@dataclass
class InspectConfig:
    """Arguments of `unimm-inspect-data` (`unimm.cli.inspect_data`, the program around `inspect_samples`)."""

    model: str = field(default=None, metadata={"help": "UniMM model dir (tokenizer + config.json with vocab_layout)."})
    data: str = field(default=None, metadata={"help": "LLaVA JSON/jsonl, a code cache directory, or a .txt file."})
    task: str = field(default="auto", metadata={"help": "auto, conversation, caption, t2i or text."})
    num_samples: int = field(default=3, metadata={"help": "How many samples to show (from the start)."})
    code_cache: str | None = field(default=None, metadata={"help": "Code cache with the LLaVA images' codes."})
    num_image_positions: int = field(default=16, metadata={"help": "Positions per image slot without a cache."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate samples as training would."})
    chat_format: str = field(default="auto", metadata={
        "help": "auto, chat_template, llama-2, plain, v1, llava_llama_2 or llava_plain."})
    uncond_prob: float = field(default=0.1, metadata={"help": "t2i prompt dropout, as in training."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for conversations."})

    def __post_init__(self) -> None:
        if self.model is None or self.data is None:
            raise ValueError("inspect needs --model and --data")
        if self.task not in ("auto", "conversation", "caption", "t2i", "text"):
            raise ValueError(f"--task must be auto, conversation, caption, t2i or text, got {self.task!r}")


def load_layout(model_dir: str | Path) -> VocabLayout:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}; --model must be a saved UniMM model directory")
    config = json.loads(path.read_text())
    if not config.get("vocab_layout"):
        raise ValueError(f"{path} has no vocab_layout: the model was not extended with visual tokens "
                         "(unimm.llm.vocab.extend_tokenizer_and_model)")
    return VocabLayout.from_dict(config["vocab_layout"])


def format_sample(sample: Sample, text_tokenizer, layout: VocabLayout) -> str:
    """One line per token (`S` = supervised target), one line per image slot's visual positions."""
    lines = [f"=== sample {sample.sample_id} ({sample.task}): {len(sample)} tokens, {sample.num_supervised} "
             f"supervised, {len(sample.image_spans)} image slot(s) ==="]
    span_at = {start: (stop, k) for k, (start, stop) in enumerate(sample.image_spans)}
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    position = 0
    while position < len(ids):
        if position in span_at:
            stop, k = span_at[position]
            supervised = sum(1 for label in labels[position:stop] if label != IGNORE_INDEX)
            if sample.visual_codes:
                source = "codes " + ", ".join(f"{name}[{stop - position}x{codes.shape[1]}]"
                                              for name, codes in sample.visual_codes.items())
            elif layout.flat_codes:
                source = "flat code tokens " + " ".join(str(layout.token_to_code(i)) for i in ids[position:stop][:8])
            else:
                source = "continuous features"
            key = sample.image_keys[k] if k < len(sample.image_keys) else None
            lines.append(f"{position:6d}-{stop - 1:<6d} [image {k}: {stop - position} positions, {source}"
                         f"{', ' + key if key else ''}; {supervised} supervised]")
            position = stop
            continue
        token = text_tokenizer.convert_ids_to_tokens(ids[position])
        text = text_tokenizer.decode([ids[position]])
        mark = "S" if labels[position] != IGNORE_INDEX else "."
        lines.append(f"{position:6d} {mark} {ids[position]:>7d} {token!s:<20} {text!r}")
        position += 1
    targets = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX and i != layout.image_token_id and not (
        layout.flat_codes and layout.code_token_offset is not None and i >= layout.code_token_offset)]
    lines.append(f"supervised text: {text_tokenizer.decode(targets)!r}")
    return "\n".join(lines)


def inspect_samples(config: InspectConfig) -> list[str]:
    """Build the first `num_samples` samples of `config.data` and format them (bad records are shown as errors)."""
    from transformers import AutoTokenizer

    from unimm.data.code_cache import load_code_cache
    from unimm.data.sources import read_llava_json, read_text_records
    from unimm.data.tasks import CodeCacheImages, SampleConfig, SampleFactory

    text_tokenizer = AutoTokenizer.from_pretrained(config.model)
    layout = load_layout(config.model)
    factory = SampleFactory(text_tokenizer, layout, SampleConfig(
        max_length=config.max_length, uncond_prob=config.uncond_prob, chat_format=config.chat_format,
        system_prompt=config.system_prompt))
    data = Path(config.data)
    task = config.task
    if task == "auto":
        task = "caption" if data.is_dir() else "text" if data.suffix == ".txt" else "conversation"
    out: list[str] = []

    def show(build, sample_id: str) -> None:
        try:
            out.append(format_sample(build(), text_tokenizer, layout))
        except SampleError as err:
            out.append(f"=== sample {sample_id}: SKIPPED ({err}) ===")

    if task in ("caption", "t2i"):
        cache = load_code_cache(data, None)
        for i in range(min(config.num_samples, len(cache))):
            row = cache[i]
            if task == "caption":
                show(lambda row=row: factory.caption(row["id"], row.get("text") or "", ImageSlot(
                    codes=row["codes"], image_key=row["id"])), row["id"])
            else:
                show(lambda row=row: factory.t2i(row["id"], row.get("text"), row["codes"]), row["id"])
    elif task == "conversation":
        records = read_llava_json(data)
        cache = load_code_cache(config.code_cache, None) if config.code_cache else None
        for i in range(min(config.num_samples, len(records))):
            record = records[i]

            def build(record=record) -> Sample:
                # a reference the cache does not hold (a folder, a typo) is a bad record, shown as training skips it
                slots = [CodeCacheImages(cache)(ref, record["id"]) if cache is not None else
                         ImageSlot(num_positions=config.num_image_positions, image_key=ref)
                         for ref in record["images"]]
                return factory.conversation(record, slots)

            show(build, record["id"])
    else:
        records = read_text_records(data)
        for i in range(min(config.num_samples, len(records))):
            show(lambda r=records[i]: factory.text(r["id"], r["text"]), records[i]["id"])
    return out
