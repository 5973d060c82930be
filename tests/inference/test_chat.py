"""`unimm.inference.chat`: the prompt comes from the training sample builder without targets
(`require_supervision=False`) and is token for token the prompt the old fake-EOS construction gave."""

from __future__ import annotations

import pytest
import torch

from unimm.data.sequence import TokenIds
from unimm.data.tasks import ChatFormatConfig
from unimm.data.templates import ChatMessage
from unimm.inference.chat import answer, chat_factory, chat_prompt, image_slot
from unimm.inference.stack import InferenceStack, load_for_inference
from unimm.llm.layout import IGNORE_INDEX


@pytest.fixture(scope="module")
def stack(tiny_unimm, toy) -> InferenceStack:
    from unimm.tokenizer import load_visual_tokenizer

    model, text_tokenizer = load_for_inference(tiny_unimm, torch.device("cpu"))
    return InferenceStack(model, text_tokenizer, load_visual_tokenizer(toy["tokenizer"]), torch.device("cpu"))


def _fake_eos_prompt(factory, stack, image, question, sample_id):
    """The construction scripts/chat.py used: a supervised EOS past the prompt so the builder accepts it, then cut."""
    messages = [ChatMessage("system", [factory.config.system_prompt])] if factory.config.system_prompt else []
    parts = [image_slot(stack, image, sample_id), "\n"] if image is not None else []
    messages.append(ChatMessage("user", parts + [question]))
    segments = factory.chat_format.segments(messages, sample_id, add_generation_prompt=True)
    end = TokenIds([factory.text_tokenizer.eos_token_id], supervise=True)
    sample = factory.builder.build([*segments, end], sample_id, "chat")
    codes = {g: c[:-1] for g, c in sample.visual_codes.items()} if sample.visual_codes else None
    return sample.input_ids[:-1], codes


@pytest.mark.parametrize("with_image, system", [(True, None), (False, "Be brief."), (True, "Be brief.")])
def test_prompt_equals_the_fake_eos_construction(stack, toy, with_image, system):
    factory = chat_factory(stack, ChatFormatConfig(system_prompt=system))
    image = str(toy["images"] / "blue_1.png") if with_image else None
    sample = chat_prompt(factory, stack, image, "what colour is it?", "q0")
    ids, codes = _fake_eos_prompt(factory, stack, image, "what colour is it?", "q0")
    assert torch.equal(sample.input_ids, ids)
    assert bool((sample.labels == IGNORE_INDEX).all())  # a prompt, nothing to train on
    assert (sample.visual_codes is None) == (codes is None) == (not with_image)
    if with_image:
        for group, value in codes.items():
            assert torch.equal(sample.visual_codes[group], value)


def test_answer_is_greedy_and_repeatable(stack, toy):
    factory = chat_factory(stack, ChatFormatConfig())
    sample = chat_prompt(factory, stack, str(toy["images"] / "red_0.png"), "what colour is it?", "q0")
    first, second = (answer(stack, sample, max_new_tokens=5) for _ in range(2))
    assert isinstance(first, str) and first == second


def test_streamed_pieces_make_the_answer(stack, toy):
    """`answer(on_text=)`: the pieces, in order, concatenate to the answer returned without streaming (same seed)."""
    factory = chat_factory(stack, ChatFormatConfig())
    sample = chat_prompt(factory, stack, str(toy["images"] / "red_0.png"), "what colour is it?", "q0")
    # this untrained model: greedy writes only newlines (the answer is ""); sampling writes pieces of words and
    # bytes of unfinished characters (U+FFFD until completed), which must not be sent ahead of the text
    for sampling in (dict(), dict(do_sample=True, temperature=1.5, seed=3), dict(do_sample=True, seed=1)):
        pieces: list[str] = []
        streamed = answer(stack, sample, max_new_tokens=12, on_text=pieces.append, **sampling)
        assert streamed == answer(stack, sample, max_new_tokens=12, **sampling)
        assert "".join(pieces) == streamed and all(pieces), (sampling, pieces)
        assert len(pieces) > 1 or not sampling, pieces  # several parts, not once at the end


def test_history_continues_the_conversation(stack, toy):
    factory = chat_factory(stack, ChatFormatConfig(system_prompt="Be brief."))
    image = str(toy["images"] / "red_0.png")
    first = chat_prompt(factory, stack, image, "what colour is it?", "q0")
    assert torch.equal(chat_prompt(factory, stack, image, "what colour is it?", "q0", history=()).input_ids,
                       first.input_ids)
    second = chat_prompt(factory, stack, image, "and its shape?", "q1", history=[("what colour is it?", "red")])
    text = stack.text_tokenizer.decode(second.input_ids)
    assert text.index("Be brief.") < text.index("what colour is it?") < text.index("red") < text.index("and its")
    # the first prompt, up to where its answer starts, is where the second begins (the image with the first question)
    assert torch.equal(second.input_ids[: len(first)], first.input_ids)
    for group, codes in first.visual_codes.items():
        assert torch.equal(second.visual_codes[group][: len(first)], codes)
        assert bool((second.visual_codes[group][len(first):] == -1).all()), group  # no second image
