"""LLaVA-1.5's conversation formats `v1`, `llava_llama_2` and `llava_plain` against the prompt text LLaVA renders.

The expected strings below are written by hand from the rules of haotian-liu/LLaVA:
- `llava/conversation.py`, `Conversation.get_prompt` with `conv_vicuna_v1` (SeparatorStyle.TWO: `system + " "`, then
  `role + ": " + message` followed by sep " " after user turns and sep2 "</s>" after assistant turns) and
  `conv_llava_llama_2` (SeparatorStyle.LLAMA_2: `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n` before the first message, each
  user turn `<s>[INST] {msg} [/INST]`, each answer `" " + answer + " </s>"`, the leading `<s>` stripped; the
  tokenizer adds the BOS);
- `llava/train/train.py`, `preprocess_multimodal`: a message holding `<image>` becomes
  `("<image>\\n" + message.replace("<image>", "").strip()).strip()`; `preprocess_plain` (`--version plain`): the
  user message is replaced by `<image>`, then the answer and sep "\\n", supervised after the image.
Labels are not compared with LLaVA's (`preprocess_v1` / `preprocess_llama_2` re-tokenise rounds and are off by one
without a legacy tokenizer or BOS, and zero samples whose text holds `</s>`): they must be exactly each answer and
its turn end.
"""

from __future__ import annotations

import pytest
import torch

from unimm.data.sequence import ImageSlot, MalformedRecordError, Text, TokenIds
from unimm.data.sources import llava_messages, normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.data.templates import ChatMessage, LlavaLlama2Format, VicunaV1Format, get_chat_format, llava_image_first
from unimm.llm.layout import IGNORE_INDEX

V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
LL2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
              "the user provides, and assist the user with a variety of tasks using natural language.")
NUM_POSITIONS = 3

CONVERSATIONS = {
    "one-turn": [("<image>\nWhat colour is the shape?", "The shape is red.")],
    # the image written last (and with stray spaces) moves to the front, LLaVA's preprocess_multimodal
    "multi-turn": [("  Describe the image please.\n<image>  ", "A blue triangle in the centre."),
                   ("And its colour?", "Blue, mostly."),
                   ("Anything else?\nJust one thing.", "No.")],
    "text": [("Give me three colours.", "Red, green and blue."), ("And a shape?", "A circle.")],
}
# LLaVA's conv.get_prompt() for each conversation, by hand.
EXPECTED = {
    "v1": {
        "one-turn": V1_SYSTEM + " USER: <image>\nWhat colour is the shape? ASSISTANT: The shape is red.</s>",
        "multi-turn": V1_SYSTEM + " USER: <image>\nDescribe the image please. ASSISTANT: A blue triangle in the "
                                  "centre.</s>USER: And its colour? ASSISTANT: Blue, mostly.</s>USER: Anything "
                                  "else?\nJust one thing. ASSISTANT: No.</s>",
        "text": V1_SYSTEM + " USER: Give me three colours. ASSISTANT: Red, green and blue.</s>USER: And a shape? "
                            "ASSISTANT: A circle.</s>",
    },
    "llava_llama_2": {
        "one-turn": f"[INST] <<SYS>>\n{LL2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST] The "
                    "shape is red. </s>",
        "multi-turn": f"[INST] <<SYS>>\n{LL2_SYSTEM}\n<</SYS>>\n\n<image>\nDescribe the image please. [/INST] A "
                      "blue triangle in the centre. </s><s>[INST] And its colour? [/INST] Blue, mostly. </s><s>[INST] "
                      "Anything else?\nJust one thing. [/INST] No. </s>",
        "text": f"[INST] <<SYS>>\n{LL2_SYSTEM}\n<</SYS>>\n\nGive me three colours. [/INST] Red, green and blue. "
                "</s><s>[INST] And a shape? [/INST] A circle. </s>",
    },
}
# The turn end each format supervises after an answer (LLAMA_2 style puts a space before `</s>`).
TURN_END = {"v1": "</s>", "llava_llama_2": " </s>"}
FORMATS = list(EXPECTED)


def _record(name: str) -> dict:
    turns = [{"from": who, "value": value} for pair in CONVERSATIONS[name]
             for who, value in zip(("human", "gpt"), pair)]
    return normalise_llava_record({"id": name, "conversations": turns}, 0, "test")


def _images(name: str) -> list[ImageSlot]:
    count = sum(user.count("<image>") for user, _ in CONVERSATIONS[name])
    g = torch.Generator().manual_seed(0)
    return [ImageSlot(codes={"semantic": torch.randint(0, 32, (NUM_POSITIONS, 1), generator=g)}) for _ in range(count)]


def _rendered_text(tokenizer, segments) -> str:
    """The prompt text the segments stand for: texts verbatim, token ids as their token strings, images as
    `<image>`."""
    pieces = []
    for segment in segments:
        if isinstance(segment, Text):
            pieces.append(segment.text)
        elif isinstance(segment, TokenIds):
            pieces.append("".join(tokenizer.convert_ids_to_tokens(list(segment.ids))))
        else:
            pieces.append("<image>")
    return "".join(pieces)


def _llava_ids(tokenizer, prompt: str) -> list[int]:
    """The tokenizer's encoding of LLaVA's prompt text in one call, with LLaVA's BOS, and each `<image>` written as
    the image span UniMM puts there (`<|boi|> <|image|> x N <|eoi|>`, special tokens of the extended tokenizer)."""
    span = "<|boi|>" + "<|image|>" * NUM_POSITIONS + "<|eoi|>"
    ids = tokenizer(prompt.replace("<image>", span), add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


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


def _answer_run(tokenizer, fmt: str, answer: str) -> list[int]:
    """Ids of one supervised answer: the answer as fresh text (its first word takes the boundary space), the
    space LLAMA_2 style puts before `</s>`, and EOS. Literal special strings in the answer stay text."""
    ids = tokenizer(answer + (" " if fmt == "llava_llama_2" else ""), add_special_tokens=False,
                    split_special_tokens=True)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_rendered_text_is_llavas_prompt(fmt, name, llama):
    tokenizer, _ = llama
    messages = llava_messages(_record(name), _images(name))
    segments = get_chat_format(tokenizer, fmt).segments(messages, name)
    assert _rendered_text(tokenizer, segments) == tokenizer.bos_token + EXPECTED[fmt][name]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", ["real_llama", "llama"])
def test_ids_are_the_tokenizers_encoding_and_labels_exactly_the_answers(style, fmt, name, request):
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    sample = factory.conversation(_record(name), _images(name))
    expected = _llava_ids(tokenizer, EXPECTED[fmt][name])
    assert tokenizer.convert_ids_to_tokens(sample.input_ids.tolist()) == tokenizer.convert_ids_to_tokens(expected)
    answers = [answer for _, answer in CONVERSATIONS[name]]
    assert _runs(sample.labels) == [_answer_run(tokenizer, fmt, answer) for answer in answers]
    assert [tokenizer.decode(run) for run in _runs(sample.labels)] == [a + TURN_END[fmt] for a in answers]


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_strings_in_text_stay_text_and_keep_the_sample(fmt, real_llama):
    """LLaVA splits rounds on the text `</s>` and zeroes the whole sample when the counts then disagree; here
    `</s>`, `<s>` and `<unk>` written in a message are text and the labels are unchanged."""
    tokenizer, layout = real_llama
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    pairs = [("<image>\nType </s>, <s> and <unk> literally.", "Done: </s> <s> <unk>."), ("Again?", "Yes.")]
    turns = [{"from": who, "value": v} for pair in pairs for who, v in zip(("human", "gpt"), pair)]
    record = normalise_llava_record({"id": "literal", "conversations": turns}, 0, "t")
    sample = factory.conversation(record, [ImageSlot(codes={"semantic": torch.zeros(NUM_POSITIONS, 1).long()})])
    assert _runs(sample.labels) == [_answer_run(tokenizer, fmt, answer) for _, answer in pairs]
    ids = sample.input_ids
    assert int((ids == tokenizer.eos_token_id).sum()) == len(pairs)
    assert int((ids == tokenizer.bos_token_id).sum()) == (1 if fmt == "v1" else len(pairs))
    assert int((ids == tokenizer.unk_token_id).sum()) == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", ["real_llama", "real_llama_legacy", "llama"])
def test_generation_prompt_is_the_training_prefix(fmt, style, request):
    """What inference sends ends where LLaVA's prompt with an empty assistant turn ends (`ASSISTANT:` / `[/INST]`)
    and is exactly what training put before the last answer."""
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format=fmt))
    name = "multi-turn"
    images = _images(name)
    train = factory.conversation(_record(name), images)
    messages = llava_messages(_record(name), images)[:-1]
    prompt = factory.generation_prompt(messages)
    last_answer_start = int((train.labels != IGNORE_INDEX).nonzero()[-1]) + 1 - len(_runs(train.labels)[-1])
    assert prompt.input_ids.tolist() == train.input_ids[:last_answer_start].tolist()
    full = EXPECTED[fmt][name]
    cut = " ASSISTANT:" if fmt == "v1" else " [/INST]"
    assert prompt.input_ids.tolist() == _llava_ids(tokenizer, full[: full.rindex(cut) + len(cut)])


def test_bpe_tokenizer_without_bos(qwen):
    """A byte-level BPE tokenizer without BOS (Qwen): no token is lost at the start (LLaVA's masks assume a BOS)
    and `v1` still supervises exactly the answers and EOS; `llava_llama_2` needs a BOS and says so."""
    tokenizer, layout = qwen
    assert tokenizer.bos_token_id is None
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format="v1"))
    sample = factory.conversation(_record("one-turn"), _images("one-turn"))
    # byte-level BPE marks no word start by itself: the boundary space is the answer's first token text
    assert _runs(sample.labels) == [_answer_run(tokenizer, "v1", " The shape is red.")]
    text = EXPECTED["v1"]["one-turn"].replace("</s>", tokenizer.eos_token)
    assert sample.input_ids.tolist() == _llava_ids(tokenizer, text)
    with pytest.raises(ValueError, match="llava_llama_2 chat format needs a tokenizer with BOS"):
        SampleFactory(tokenizer, layout, SampleConfig(chat_format="llava_llama_2")).conversation(
            _record("one-turn"), _images("one-turn"))


def test_formats_are_selected_by_llavas_version_names(llama):
    tokenizer, layout = llama
    assert isinstance(SampleFactory(tokenizer, layout, SampleConfig(chat_format="v1")).chat_format, VicunaV1Format)
    assert isinstance(get_chat_format(tokenizer, "llava_llama_2"), LlavaLlama2Format)
    system = [ChatMessage("system", ["Be brief."])]
    turns = [ChatMessage("user", ["Hi"]), ChatMessage("assistant", ["Hello"])]
    text = _rendered_text(tokenizer, get_chat_format(tokenizer, "v1").segments(system + turns, "s"))
    assert text == tokenizer.bos_token + "Be brief. USER: Hi ASSISTANT: Hello</s>"  # a configured system prompt wins


def test_image_placement_rule():
    a, b = ImageSlot(num_positions=1), ImageSlot(num_positions=1)
    assert llava_image_first([" Look: ", a, " what is it?  "]) == [a, "\nLook:  what is it?"]
    assert llava_image_first([a]) == [a]  # image-only message: no newline (LLaVA strips it)
    assert llava_image_first(["Compare ", a, " and ", b]) == [a, "\n", b, "\nCompare  and"]
    assert llava_image_first([" no image "]) == [" no image "]


@pytest.mark.parametrize("style", ["real_llama", "real_llama_legacy", "llama"])
def test_llava_plain_is_image_answer_newline(style, request):
    tokenizer, layout = request.getfixturevalue(style)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=None, chat_format="llava_plain"))
    caption = "A red circle on a white background."
    record = normalise_llava_record({"id": "blip", "conversations": [
        {"from": "human", "value": "Give a brief description of the image.\n<image>"},
        {"from": "gpt", "value": caption}]}, 0, "t")
    images = [ImageSlot(codes={"semantic": torch.ones(NUM_POSITIONS, 1).long()})]
    sample = factory.conversation(record, images)
    expected = _llava_ids(tokenizer, "<image>" + caption + "\n")  # the user's text is dropped, as LLaVA does
    assert sample.input_ids.tolist() == expected
    after_image = expected.index(layout.eoi_token_id) + 1
    assert _runs(sample.labels) == [expected[after_image:]]
    assert tokenizer.decode(expected[after_image:]) == caption + "\n"
    prompt = factory.generation_prompt(llava_messages(record, images)[:1])
    assert prompt.input_ids.tolist() == expected[:after_image]
    two_turns = normalise_llava_record({"id": "two", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "More"}, {"from": "gpt", "value": "b"}]}, 0, "t")
    with pytest.raises(MalformedRecordError, match="one user turn with an image and one answer"):
        factory.conversation(two_turns, images)
    with pytest.raises(ValueError, match="no system prompt"):
        SampleFactory(tokenizer, layout, SampleConfig(chat_format="llava_plain", system_prompt="Hi")).conversation(
            record, images)
