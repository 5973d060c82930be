"""The data layer on real tokenizers: Qwen2.5's 151k byte-level BPE (ChatML template) and Mistral's 32k LLaMA-kind
SentencePiece model, both read from PyPI wheels (see tests/conftest.py). Tiny trained tokenizers hide how real ones
treat segment boundaries; these tests pin the text the model sees to the text of the format."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer

from unimm.data.sequence import ImageSlot, SequenceBuilder, Text
from unimm.data.sources import normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.data.templates import ChatMessage
from unimm.llm.layout import IGNORE_INDEX, t2i_prefix_ids

LITERAL = "Type <|im_end|>, <|im_start|>, </s>, <s>, [INST] and <|boi|> literally."
CONVERSATIONS = {
    "text": [("Give me three colours.", "Red, green and blue."),
             ("And a shape?\nJust one.", "A circle.")],
    "image-first": [("<image>\nWhat colour is the shape?", "The shape is red."),
                    (LITERAL, "It is on the left.")],
    "image-last": [("Describe the image please.\n<image>", "A blue triangle in the centre.")],
}
# (fixture, chat format): every format each tokenizer supports.
CASES = [("real_qwen", "chat_template"), ("real_qwen", "plain"), ("real_llama", "llama-2"), ("real_llama", "plain")]


def _record(name: str) -> dict:
    turns = [{"from": who, "value": value} for pair in CONVERSATIONS[name] for who, value in zip(("human", "gpt"), pair)]
    return normalise_llava_record({"id": name, "conversations": turns}, 0, "test")


def _images(name: str) -> list[ImageSlot]:
    count = sum(user.count("<image>") for user, _ in CONVERSATIONS[name])
    g = torch.Generator().manual_seed(0)
    return [ImageSlot(codes={"semantic": torch.randint(0, 32, (3, 1), generator=g)}) for _ in range(count)]


def _format_text(tokenizer, fmt: str, pairs, generation_prompt: bool = False) -> str:
    """The format's own text: what the chat template renders, or the named format written out by hand."""
    if fmt == "chat_template":
        messages = [{"role": role, "content": text} for user, answer in pairs
                    for role, text in (("user", user), ("assistant", answer))]
        if generation_prompt:
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    if fmt == "llama-2":
        text = "".join(f"{bos}[INST] {user} [/INST] {answer}{eos}" for user, answer in pairs)
        return text[: text.rindex(" [/INST]") + len(" [/INST]")] if generation_prompt else text
    text = bos + "".join(f"{user}\n{answer}{eos}" for user, answer in pairs)
    return text[: text.rindex("\n") + 1] if generation_prompt else text


def _decode(tokenizer, ids: list[int]) -> str:
    """Decoded text, one document per BOS: SentencePiece marks the start of each document's text with `▁` (Meta
    encodes each LLaMA-2 turn pair in its own call), which a decoder drops only at the start of what it decodes."""
    bos = tokenizer.bos_token_id
    if bos is None or bos not in ids:
        return tokenizer.decode(ids)
    starts = [i for i, t in enumerate(ids) if t == bos]
    head = tokenizer.decode(ids[: starts[0]]) if starts[0] else ""
    bounds = [*starts, len(ids)]
    return head + "".join(tokenizer.bos_token + tokenizer.decode(ids[a + 1:b]) for a, b in zip(bounds, bounds[1:]))


def _decode_with_images(tokenizer, layout, ids: torch.Tensor) -> str:
    text = _decode(tokenizer, ids.tolist())
    return re.sub(re.escape("<|boi|>") + "(" + re.escape("<|image|>") + ")+" + re.escape("<|eoi|>"), "<image>", text)


def _runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for value in labels.tolist() + [IGNORE_INDEX]:
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize(("style", "fmt"), CASES)
def test_supervised_tokens_and_input_text_are_exactly_the_format(style, fmt, name, request):
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    images = _images(name)
    sample = factory.conversation(_record(name), images)
    pairs = CONVERSATIONS[name]
    end = "<|im_end|>" if fmt == "chat_template" else tokenizer.eos_token
    # supervised: exactly each answer and its turn end, nothing of the prompt
    assert [tokenizer.decode(run) for run in _runs(sample.labels)] == [answer + end for _, answer in pairs]
    # input: exactly the format's text, no character added or lost at any segment boundary
    assert _decode_with_images(tokenizer, layout, sample.input_ids) == _format_text(tokenizer, fmt, pairs)
    # literal special strings in user text stay text: control tokens only where the format puts them
    count = {tid: int((sample.input_ids == tid).sum()) for tid in (layout.boi_token_id, tokenizer.eos_token_id)}
    assert count[layout.boi_token_id] == len(images)
    if fmt == "chat_template":  # one <|im_end|> per turn plus the default system turn
        assert count[tokenizer.eos_token_id] == 2 * len(pairs) + 1
    else:
        assert count[tokenizer.eos_token_id] == len(pairs)
    if tokenizer.bos_token_id is not None:
        expected_bos = len(pairs) if fmt == "llama-2" else 1
        assert int((sample.input_ids == tokenizer.bos_token_id).sum()) == expected_bos


@pytest.mark.parametrize(("style", "fmt"), [case for case in CASES if case != ("real_qwen", "plain")])
def test_text_conversation_ids_equal_one_call_tokenisation(style, fmt, request):
    """Segment-wise ids equal tokenising the format's text in one call (one call per turn pair for LLaMA-2, as
    Meta's reference does): the builder adds no word-boundary mark and splits no word at a segment boundary.
    Not for `plain` on byte-level BPE, whose one-call tokenisation merges punctuation with the newline that
    separates prompt from answer (`.Ċ`): the label boundary needs that cut."""
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    pairs = CONVERSATIONS["text"] if fmt != "plain" else CONVERSATIONS["text"][:1]
    ids = factory.conversation(_record("text"), []).input_ids.tolist()
    kwargs = {"add_special_tokens": False}
    if fmt == "chat_template":
        expected = tokenizer(_format_text(tokenizer, fmt, pairs), **kwargs)["input_ids"]
    elif fmt == "llama-2":
        expected = [i for user, answer in pairs for i in [tokenizer.bos_token_id, *tokenizer(
            f"[INST] {user} [/INST] {answer}", **kwargs)["input_ids"], tokenizer.eos_token_id]]
    else:
        (user, answer), = pairs
        ids = factory.conversation(normalise_llava_record({"id": "one", "conversations": [
            {"from": "human", "value": user}, {"from": "gpt", "value": answer}]}, 0, "t"), []).input_ids.tolist()
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        expected = bos + tokenizer(f"{user}\n{answer}", **kwargs)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(expected)


@pytest.mark.parametrize(("style", "fmt"), CASES)
def test_generation_prompt_is_the_training_prefix(style, fmt, request):
    """What chat sends at inference is exactly what training put before the last answer, and the format's text."""
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    name = "image-first"
    images = _images(name)
    train = factory.conversation(_record(name), images)
    messages = [ChatMessage(role, [p for p in parts if p != ""]) for role, parts in (
        ("user", [images[0], "\nWhat colour is the shape?"]), ("assistant", ["The shape is red."]),
        ("user", [LITERAL]))]
    prompt = factory.generation_prompt(messages)
    last_answer_start = int((train.labels != IGNORE_INDEX).nonzero()[-1]) + 1 - len(_runs(train.labels)[-1])
    assert prompt.input_ids.tolist() == train.input_ids[:last_answer_start].tolist()
    assert _decode_with_images(tokenizer, layout, prompt.input_ids) == _format_text(
        tokenizer, fmt, CONVERSATIONS[name], generation_prompt=True)


@pytest.mark.parametrize("style", ["real_qwen", "real_llama"])
def test_caption_text_and_t2i_prompts(style, request):
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, uncond_prob=0.0))
    caption = "A red circle <|eoi|> on the left."
    sample = factory.caption("c", caption, _images("image-first")[0])
    assert [tokenizer.decode(run) for run in _runs(sample.labels)] == [caption + tokenizer.eos_token]
    assert int((sample.input_ids == layout.eoi_token_id).sum()) == 1  # the literal one stayed text
    prompt = "a photo of <|boi|> a cat"
    ids = t2i_prefix_ids(tokenizer, layout, prompt)
    assert ids[-1] == layout.boi_token_id and ids.count(layout.boi_token_id) == 1
    assert _decode(tokenizer, ids[:-1]) == (tokenizer.bos_token or "") + prompt
    text = factory.text("t", "Hello world.\n  Two spaces, a tab\tand 42 digits.")
    assert _decode(tokenizer, text.input_ids.tolist()) == ((tokenizer.bos_token or "") + "Hello world.\n  Two spaces, "
                                                          "a tab\tand 42 digits." + tokenizer.eos_token)


@pytest.mark.parametrize("style", ["real_qwen", "real_llama"])
def test_builder_text_round_trips_any_segmentation(style, request):
    """However a string is cut into segments, the ids decode to the string (the segment-spacing bug added a space
    at every cut with SentencePiece)."""
    tokenizer, layout = request.getfixturevalue(style)
    builder = SequenceBuilder(tokenizer, layout)
    text = "Give me\nthe answer: 3 apples, (two) pears  and\n\nnothing else!"
    for cuts in ([7], [4, 8, 9], [13, 20, 21, 40], list(range(1, len(text), 5))):
        bounds = [0, *cuts, len(text)]
        segments = [Text(text[a:b], supervise=True) for a, b in zip(bounds, bounds[1:])]
        ids = builder.build(segments, "cut", "text").input_ids.tolist()
        assert tokenizer.decode(ids) == text, cuts
    assert builder.marks_text_start == (style == "real_llama")


@pytest.mark.parametrize("style", ["real_qwen_tokenizer_path", "real_llama_tokenizer_path"])
@pytest.mark.parametrize("flat_codes", [False, True])
def test_vocabulary_ids_stable_across_save_and_load(style, flat_codes, request, tmp_path):
    from tests.llm.conftest import make_unimm
    from unimm.llm import SPECIAL_TOKENS, UniMMForCausalLM, encode_plain_text
    from unimm.llm.vocab import code_token
    from unimm.testing import build_tiny_llm

    original = AutoTokenizer.from_pretrained(request.getfixturevalue(style))
    family = "qwen2" if "qwen" in style else "llama"  # AutoTokenizer follows the model type in transformers 5
    llm = build_tiny_llm(tmp_path / "llm", family, original, hidden_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1)
    spec = {"semantic": (300, 1)} if flat_codes else {"semantic": (300, 1), "pixel": (64, 2)}
    model, tokenizer, layout = make_unimm(llm, spec, flat_codes=flat_codes)
    text = "Give me <|boi|> and <|code_5|>: 12 colours, 你好."
    assert encode_plain_text(tokenizer, text) == encode_plain_text(original, text)  # old ids untouched
    assert layout.original_vocab_size == len(original)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert UniMMForCausalLM.from_pretrained(tmp_path / "saved").config.layout == layout
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [
        layout.boi_token_id, layout.eoi_token_id, layout.image_token_id, layout.uncond_token_id]
    assert encode_plain_text(reloaded, text) == encode_plain_text(original, text)
    if flat_codes:
        assert reloaded.convert_tokens_to_ids([code_token(k) for k in (0, 299)]) == [
            layout.code_token_offset, layout.code_token_offset + 299]


# Images at the start of a message (before a newline), after a space at its end, and a turn after a turn's EOS.
IMAGE_PAIRS = [("<image>\nWhat colour is the shape?", "The shape is red."), ("And this one? <image>", "It is blue."),
               ("Which is larger?", "The first.")]
NUM_POSITIONS = 3


def _llava_first(user: str) -> str:
    """LLaVA's preprocess_multimodal: a message with an image starts with it and a newline, its text stripped."""
    return ("<image>\n" + user.replace("<image>", "").strip()).strip() if "<image>" in user else user


def _one_call_ids(tokenizer, fmt: str, pairs) -> list[int]:
    """The tokenizer's own ids for the format's text: one call over the whole text (one per turn pair for llama-2,
    as Meta's reference encodes), BOS as the id the tokenizer's `add_special_tokens` puts first, and every
    `<image>` written as the span UniMM puts there, `<|boi|> <|image|> x N <|eoi|>`.

    Why the span itself stands for the image: its tokens are special tokens of the extended tokenizer, so each is
    one piece and the tokenizer splits the text around them as around `</s>`: the text before an image ends there
    (a space before it stays a lone `▁`: no word follows for it to join), and the text after it starts as this
    tokenizer starts text after a special token (`</s>What` by default, `</s>▁What` with legacy pre-tokenisation).
    An ordinary one-piece word as the placeholder would instead take the space before it (`▁word`), which an
    image span cannot, and would continue into the text after it."""
    from tests.data.test_llava_formats import LL2_SYSTEM, V1_SYSTEM

    span = "<|boi|>" + "<|image|>" * NUM_POSITIONS + "<|eoi|>"
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    bos_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text.replace("<image>", span), add_special_tokens=False)["input_ids"])

    if fmt == "llama-2":
        return [i for user, answer in pairs for i in bos_ids + encode(f"[INST] {user} [/INST] {answer}") + [
            tokenizer.eos_token_id]]
    if fmt == "plain":
        return bos_ids + encode("".join(f"{user}\n{answer}{eos}" for user, answer in pairs))
    if fmt == "chat_template":
        messages = [{"role": role, "content": text} for user, answer in pairs
                    for role, text in (("user", user), ("assistant", answer))]
        return encode(tokenizer.apply_chat_template(messages, tokenize=False))
    if fmt == "v1":
        return bos_ids + encode(V1_SYSTEM + " " + "".join(f"USER: {_llava_first(user)} ASSISTANT: {answer}{eos}"
                                                          for user, answer in pairs))
    if fmt == "llava_llama_2":
        turns = [f"[INST] {_llava_first(user)} [/INST] {answer} {eos}" for user, answer in pairs]
        return bos_ids + encode(f"[INST] <<SYS>>\n{LL2_SYSTEM}\n<</SYS>>\n\n" + turns[0][len("[INST] "):] +
                                "".join(bos + turn for turn in turns[1:]))
    assert fmt == "llava_plain"
    ((_, answer),) = pairs
    return bos_ids + encode(f"<image>{answer}\n")


@pytest.mark.parametrize(("style", "fmt"), [
    *[(style, fmt) for style in ("real_llama", "real_llama_legacy")
      for fmt in ("llama-2", "plain", "v1", "llava_llama_2", "llava_plain")],
    ("real_qwen", "chat_template"), ("real_qwen", "v1")])
def test_image_conversation_ids_equal_one_call_tokenisation(style, fmt, request):
    """Multi-turn conversations with images: the built ids are the tokenizer's one-call ids of the format's text
    (see `_one_call_ids`), with SentencePiece both as transformers loads it by default and with legacy
    pre-tokenisation, where text after `</s>` or an image span takes a `▁` (the one the builder used to drop);
    Qwen's byte-level BPE marks no word start, and its ids are unchanged by that rule."""
    tokenizer, layout = request.getfixturevalue(style)
    pairs = IMAGE_PAIRS[:1] if fmt == "llava_plain" else IMAGE_PAIRS
    turns = [{"from": who, "value": value} for pair in pairs for who, value in zip(("human", "gpt"), pair)]
    record = normalise_llava_record({"id": "images", "conversations": turns}, 0, "test")
    g = torch.Generator().manual_seed(0)
    images = [ImageSlot(codes={"semantic": torch.randint(0, 32, (NUM_POSITIONS, 1), generator=g)})
              for user, _ in pairs for _ in range(user.count("<image>"))]
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    sample = factory.conversation(record, images)
    assert factory.builder.marks_text_after_special == (style == "real_llama_legacy")
    expected = _one_call_ids(tokenizer, fmt, pairs)
    assert tokenizer.convert_ids_to_tokens(sample.input_ids.tolist()) == tokenizer.convert_ids_to_tokens(expected)
    # the supervised tokens are still exactly the answers and their turn ends, tokenised where they stand (byte-level
    # BPE decodes the boundary space that its answer's first token carries, `ĠThe`; SentencePiece's decoder drops it)
    end = {"chat_template": "<|im_end|>", "llava_llama_2": " " + tokenizer.eos_token,
           "llava_plain": "\n"}.get(fmt, tokenizer.eos_token)
    space = " " if (style, fmt) == ("real_qwen", "v1") else ""
    assert [tokenizer.decode(run) for run in _runs(sample.labels)] == [space + answer + end for _, answer in pairs]


# Mistral-instruct's layout: `[INST]` scaffolding after `</s>`, and each user message right after a special token.
SPECIAL_EDGED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ eos_token }}"
                          "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
                          "{% endfor %}")


@pytest.mark.parametrize("style", ["real_llama", "real_llama_legacy"])
def test_chat_template_scaffolding_ending_in_a_special_token(style, request):
    """A chat template whose scaffolding ends with a special token right before the message (`[INST]</s>` here,
    contrived so that every message follows one): the message starts as the tokenizer starts text after a special
    token, so the ids are still the one-call ids of the rendered text (images as their spans)."""
    import copy

    tokenizer, layout = request.getfixturevalue(style)
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture stays as it is
    tokenizer.chat_template = SPECIAL_EDGED_TEMPLATE
    pairs = IMAGE_PAIRS[:2]
    turns = [{"from": who, "value": value} for pair in pairs for who, value in zip(("human", "gpt"), pair)]
    record = normalise_llava_record({"id": "template", "conversations": turns}, 0, "test")
    g = torch.Generator().manual_seed(0)
    images = [ImageSlot(codes={"semantic": torch.randint(0, 32, (NUM_POSITIONS, 1), generator=g)}) for _ in pairs]
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format="chat_template",
                                                            chat_end_token=tokenizer.eos_token))
    sample = factory.conversation(record, images)
    expected = _one_call_ids(tokenizer, "chat_template", pairs)
    assert tokenizer.convert_ids_to_tokens(sample.input_ids.tolist()) == tokenizer.convert_ids_to_tokens(expected)
    assert [tokenizer.decode(run) for run in _runs(sample.labels)] == [answer + "</s>" for _, answer in pairs]
