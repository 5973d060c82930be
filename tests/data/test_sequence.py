"""Labels built from segments: conversations (Qwen chat template and LLaMA-2 format), captions, text-to-image,
truncation, special-token strings in user text, and malformed records."""

from __future__ import annotations

import re

import pytest
import torch

from unimm.data.sequence import (
    ImageSlot,
    MalformedRecordError,
    SampleError,
    SampleTooLongError,
    SequenceBuilder,
    Text,
    TokenIds,
)
from unimm.data.sources import normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory, TaskDataset
from unimm.data.templates import ChatMessage, get_chat_format
from unimm.llm.layout import IGNORE_INDEX, t2i_prefix_ids
from unimm.llm.vocab import code_token

from .conftest import DUAL_SPEC, SEMANTIC_SPEC, add_layout

RECORDS = [
    {"id": "img-start", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "The shape is red."},
        {"from": "human", "value": "Where is it? Type <|boi|> or <|im_end|> literally."},
        {"from": "gpt", "value": "It is on the left."},
    ]},
    {"id": "img-end", "image": "b.png", "conversations": [
        {"from": "human", "value": "Describe the image please.\n<image>"},
        {"from": "gpt", "value": "a blue triangle in the centre"},
        {"from": "human", "value": "And the background?"},
        {"from": "gpt", "value": "white"},
        {"from": "human", "value": "Thanks!"},
        {"from": "gpt", "value": "You are welcome."},
    ]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "hello world"},
        {"from": "gpt", "value": "the quick brown fox"},
    ]},
]


def _codes(n=4, seed=0, spec=SEMANTIC_SPEC):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, s["num_codes"], (n, s["depth"]), generator=g) for name, s in spec.items()}


def _runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs + ([current] if current else [])


def _build(factory, raw, index=0):
    record = normalise_llava_record(raw, index, "llava.json")
    images = [ImageSlot(codes=_codes(seed=i), image_key=ref) for i, ref in enumerate(record["images"])]
    return factory.conversation(record, images), images


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_llava_multi_turn_supervises_exactly_answers_and_end_tokens(style, request):
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None))
    end = "<|im_end|>" if style == "qwen" else tokenizer.eos_token
    for raw in RECORDS:
        sample, images = _build(factory, raw)
        answers = [t["value"] for t in raw["conversations"] if t["from"] == "gpt"]
        runs = _runs(sample.labels)
        assert [tokenizer.decode(run) for run in runs] == [a + end for a in answers], raw["id"]
        supervised = sample.labels != IGNORE_INDEX
        assert torch.equal(sample.labels[supervised], sample.input_ids[supervised])
        # image slots: <|boi|> image_token*N <|eoi|>, codes at exactly those positions, never supervised
        assert len(sample.image_spans) == len(images)
        assert int((sample.input_ids == layout.boi_token_id).sum()) == len(images)  # literal "<|boi|>" stays text
        for (start, stop), slot in zip(sample.image_spans, images):
            assert sample.input_ids[start - 1] == layout.boi_token_id and sample.input_ids[stop] == layout.eoi_token_id
            assert (sample.input_ids[start:stop] == layout.image_token_id).all()
            assert torch.equal(sample.visual_codes["semantic"][start:stop], slot.codes["semantic"])
            assert not supervised[start - 1:stop + 1].any()
        if images:
            visual = sample.visual_codes["semantic"][:, 0] >= 0
            assert int(visual.sum()) == sum(stop - start for start, stop in sample.image_spans)
        else:
            assert sample.visual_codes is None
        if style == "qwen":
            # The whole sequence is the tokenizer's own chat template rendering (image span <-> "<image>").
            decoded = re.sub(r"<\|boi\|>(<\|image\|>)+<\|eoi\|>", "<image>", tokenizer.decode(sample.input_ids))
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in raw["conversations"]]
            assert decoded == tokenizer.apply_chat_template(messages, tokenize=False)
            assert int((sample.input_ids == tokenizer.convert_tokens_to_ids("<|im_end|>")).sum()) == len(
                raw["conversations"])  # the literal "<|im_end|>" in the user turn did not become a control token
        else:
            assert sample.input_ids[0] == tokenizer.bos_token_id
            assert int((sample.input_ids == tokenizer.bos_token_id).sum()) == len(answers)


def test_chat_template_generation_prompt_and_llama2_system(qwen, llama):
    tokenizer, _ = qwen
    fmt = get_chat_format(tokenizer)
    segments = fmt.segments([ChatMessage("user", ["hi"])], "g", add_generation_prompt=True)
    text = "".join(s.text for s in segments)
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert not any(getattr(s, "supervise", False) for s in segments)
    ltok, llayout = llama
    factory = SampleFactory(ltok, llayout, SampleConfig(system_prompt="Be brief."))
    sample, _ = _build(factory, RECORDS[2])
    assert "<<SYS>>\nBe brief.\n<</SYS>>" in ltok.decode(sample.input_ids)
    assert [ltok.decode(r) for r in _runs(sample.labels)] == ["the quick brown fox</s>"]


def test_plain_format(qwen):
    tokenizer, layout = qwen
    factory = SampleFactory(tokenizer, layout, SampleConfig(chat_format="plain"))
    sample, _ = _build(factory, RECORDS[1])
    assert [tokenizer.decode(r) for r in _runs(sample.labels)] == [
        "a blue triangle in the centre<|im_end|>", "white<|im_end|>", "You are welcome.<|im_end|>"]
    with pytest.raises(ValueError, match="unknown chat_format 'chatml'"):
        get_chat_format(tokenizer, "chatml")


def test_template_that_rewrites_content_is_refused(qwen):
    tokenizer, layout = qwen
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                               "<|im_end|>\n{% endfor %}")
    factory = SampleFactory(tokenizer, layout)
    record = normalise_llava_record({"id": "ws", "conversations": [
        {"from": "human", "value": "  hi  "}, {"from": "gpt", "value": "yes"}]}, 0, "f")
    with pytest.raises(MalformedRecordError, match="sample ws: chat template rendering differs"):
        factory.conversation(record, [])


@pytest.mark.parametrize(("raw", "message"), [
    ({"id": "noconv", "image": "a.png"}, "sample noconv: record has no 'conversations'"),
    ({"id": "gptfirst", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "sample gptfirst: turn 0 is from 'assistant', expected 'user'"),
    ({"id": "twoimg", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                          {"from": "gpt", "value": "x"}]},
     r"sample twoimg: 2 '<image>' placeholder\(s\) for 1 image\(s\)"),
    ({"id": "noplace", "image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                                           {"from": "gpt", "value": "x"}]},
     r"sample noplace: 0 '<image>' placeholder\(s\) for 1 image\(s\)"),
    ({"id": "speaker", "conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "sample speaker: turn 1 is from unknown speaker 'bot'"),
    ({"id": "noanswer", "conversations": [{"from": "human", "value": "a"}]}, "sample noanswer: .*no answer"),
    ({"id": "badturns", "conversations": "hello"}, "sample badturns: 'conversations' must be a list"),
])
def test_malformed_llava_records_raise_with_id(qwen, raw, message):
    tokenizer, layout = qwen
    factory = SampleFactory(tokenizer, layout)
    with pytest.raises(MalformedRecordError, match=message):
        _build(factory, raw)


def test_task_dataset_skips_and_counts_bad_records(qwen):
    from unimm.data.bad_samples import BadSampleTracker, TooManyBadSamplesError

    tokenizer, layout = qwen
    factory = SampleFactory(tokenizer, layout)
    records = [normalise_llava_record(r, i, "f") for i, r in enumerate(
        [RECORDS[2], {"id": "broken"}, RECORDS[2] | {"id": "ok2"}])]
    tracker = BadSampleTracker(max_bad_fraction=0.5, min_seen=2)
    dataset = TaskDataset(records, lambda r, epoch: factory.conversation(r, []), "conversation", tracker)
    assert dataset[1].sample_id == "ok2"  # the broken record is replaced by the next one
    assert tracker.summary()["bad_examples"] == [["broken", "record has no 'conversations'"]]
    strict = TaskDataset(records, lambda r, epoch: factory.conversation(r, []), "conversation",
                         BadSampleTracker(max_bad_fraction=0.1, min_seen=0))
    with pytest.raises(TooManyBadSamplesError, match="broken: record has no 'conversations'"):
        strict[1]


# ------------------------------------------------------------------------------------------- caption / t2i


def test_caption_supervises_caption_and_eos(llama):
    tokenizer, layout = llama
    factory = SampleFactory(tokenizer, layout)
    sample = factory.caption("c1", "a red circle on the left", ImageSlot(codes=_codes()))
    assert [tokenizer.decode(r) for r in _runs(sample.labels)] == ["a red circle on the left</s>"]
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.input_ids[1] == layout.boi_token_id
    with pytest.raises(SampleError, match="sample c2: empty caption"):
        factory.caption("c2", " ", ImageSlot(codes=_codes()))


@pytest.mark.parametrize("spec", [SEMANTIC_SPEC, DUAL_SPEC])
def test_t2i_supervises_exactly_codes_and_eoi(qwen_tokenizer_path, spec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    layout = add_layout(tokenizer, spec)
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.0))
    codes = _codes(n=6, spec=spec)
    sample = factory.t2i("t1", "a green square at the top right", codes)
    prefix = t2i_prefix_ids(tokenizer, layout, "a green square at the top right")
    assert sample.input_ids[:len(prefix)].tolist() == prefix and prefix[-1] == layout.boi_token_id
    ((start, stop),) = sample.image_spans
    assert (start, stop) == (len(prefix), len(prefix) + 6) and len(sample) == stop + 1
    expected = torch.full_like(sample.labels, IGNORE_INDEX)
    expected[start:stop] = layout.image_token_id
    expected[stop] = layout.eoi_token_id
    assert torch.equal(sample.labels, expected)
    for name, group in codes.items():
        assert torch.equal(sample.visual_codes[name][start:stop], group)
        assert (sample.visual_codes[name][:start] == -1).all() and (sample.visual_codes[name][stop:] == -1).all()


def test_t2i_flat_codes_are_text_targets(qwen_tokenizer_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)
    layout = add_layout(tokenizer, SEMANTIC_SPEC, flat_codes=True)
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.0))
    codes = _codes(n=5)
    sample = factory.t2i("f1", "a red circle", codes)
    ((start, stop),) = sample.image_spans
    flat = codes["semantic"][:, 0] + layout.code_token_offset
    assert torch.equal(sample.input_ids[start:stop], flat) and torch.equal(sample.labels[start:stop], flat)
    assert sample.labels[stop] == layout.eoi_token_id and sample.visual_codes is None
    assert int((sample.labels != IGNORE_INDEX).sum()) == 6
    assert tokenizer.decode(sample.input_ids[start:stop]) == "".join(code_token(c) for c in codes["semantic"][:, 0])


def test_t2i_prompt_dropout_rate_and_determinism(qwen):
    tokenizer, layout = qwen
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.25, seed=3))
    decisions = [factory.prompt_dropped(f"id-{i}") for i in range(4000)]
    rate = sum(decisions) / len(decisions)
    assert abs(rate - 0.25) < 0.03  # binomial std is 0.007
    assert decisions == [factory.prompt_dropped(f"id-{i}") for i in range(4000)]
    assert [factory.prompt_dropped(f"id-{i}", epoch=1) for i in range(4000)] != decisions
    dropped = next(i for i, d in enumerate(decisions) if d)
    kept = next(i for i, d in enumerate(decisions) if not d)
    uncond = t2i_prefix_ids(tokenizer, layout, None)
    sample = factory.t2i(f"id-{dropped}", "a blue triangle", _codes())
    assert sample.input_ids[:len(uncond)].tolist() == uncond and layout.uncond_token_id in uncond
    sample = factory.t2i(f"id-{kept}", "a blue triangle", _codes())
    assert layout.uncond_token_id not in sample.input_ids.tolist()
    default = SampleFactory(tokenizer, layout)
    assert abs(sum(default.prompt_dropped(f"x{i}") for i in range(4000)) / 4000 - 0.1) < 0.02


# --------------------------------------------------------------------------------------------- truncation


def test_truncation_cuts_text_but_never_an_image(qwen):
    tokenizer, layout = qwen
    full = SampleFactory(tokenizer, layout, SampleConfig(max_length=None))
    sample, _ = _build(full, RECORDS[1])
    start, stop = sample.image_spans[0]
    first_answer = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    cut = first_answer + 2  # inside the first answer, after the image
    short, _ = _build(SampleFactory(tokenizer, layout, SampleConfig(max_length=cut)), RECORDS[1])
    assert len(short) == cut
    assert torch.equal(short.input_ids, sample.input_ids[:cut]) and torch.equal(short.labels, sample.labels[:cut])
    assert short.image_spans == sample.image_spans
    with pytest.raises(SampleTooLongError, match="sample img-end: .* would split the image span"):
        _build(SampleFactory(tokenizer, layout, SampleConfig(max_length=start + 2)), RECORDS[1])
    t2i = SampleFactory(tokenizer, layout, SampleConfig(max_length=10, uncond_prob=0.0))
    with pytest.raises(SampleTooLongError, match="sample long: .* exceed max_length 10"):
        t2i.t2i("long", "a red circle", _codes(n=16))
    with pytest.raises(SampleTooLongError, match="sample img-start: no supervised token"):
        _build(SampleFactory(tokenizer, layout, SampleConfig(max_length=stop + 3)), RECORDS[0])


def test_builder_checks_codes_and_segments(qwen):
    tokenizer, layout = qwen
    builder = SequenceBuilder(tokenizer, layout)
    with pytest.raises(SampleError, match=r"sample s: codes\['semantic'\] outside \[0, 32\)"):
        builder.build([ImageSlot(codes={"semantic": torch.full((2, 1), 32)}), Text("x", supervise=True)], "s", "t")
    with pytest.raises(SampleError, match="the vocabulary layout expects"):
        builder.build([ImageSlot(codes={"pixel": torch.zeros(2, 1, dtype=torch.long)})], "s", "t")
    with pytest.raises(SampleError, match="must follow <|boi|>"):
        builder.build([ImageSlot(codes=_codes(), include_boi=False)], "s", "t")
    sample = builder.build([TokenIds([5]), ImageSlot(num_positions=3, features=torch.ones(3, 7)),
                            Text("a red circle", supervise=True)], "feat", "caption")
    assert sample.visual_codes is None and len(sample.image_features) == 1
    assert (sample.input_ids[2:5] == layout.image_token_id).all()


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_batched_text_encoding_equals_encode_plain_text(style, request):
    from unimm.llm.layout import encode_plain_text

    tokenizer, layout = request.getfixturevalue(style)
    texts = ["hello world", " a <|boi|> b <|im_end|>", "x\ny", "</s> [INST]"]
    builder = SequenceBuilder(tokenizer, layout)
    sample = builder.build([Text(t, supervise=True) for t in texts], "b", "text")
    # the first text starts the string; the others continue it (no SentencePiece word-boundary mark of their own)
    expected = encode_plain_text(tokenizer, texts[0]) + [i for t in texts[1:] for i in builder.encode_text(
        Text(t), continues=True)]
    assert sample.input_ids.tolist() == expected
    assert tokenizer.decode(expected) == "".join(texts)


def test_hf_llama2_style_template_with_space_before_eos_and_refusals(llama):
    tokenizer, layout = llama
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    factory = SampleFactory(tokenizer, layout, SampleConfig(chat_format="chat_template"))
    sample, _ = _build(factory, RECORDS[0])
    runs = [tokenizer.decode(r) for r in _runs(sample.labels)]
    assert runs == ["The shape is red. </s>", "It is on the left. </s>"]
    system_first = {"id": "sys", "conversations": [{"from": "system", "value": "be brief"},
                                                   {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(MalformedRecordError, match="sample sys: the chat template refused the conversation: roles"):
        _build(factory, system_first)
