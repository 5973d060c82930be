"""Image question answering with a trained UniMM model: the prompt is built by the training sample builder (the
same chat format as finetuning, ending where the answer starts; `require_supervision=False`), then greedy or
sampled decoding. `chat_prompt(history=)` continues a conversation; `answer(on_text=)` streams the answer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from unimm.data.sequence import ImageSlot, Sample
from unimm.data.tasks import ChatFormatConfig, SampleConfig, SampleFactory
from unimm.inference.args import max_positions
from unimm.inference.stack import InferenceStack
from unimm.utils.errors import OptionError


def chat_factory(stack: InferenceStack, chat_format: ChatFormatConfig) -> SampleFactory:
    """A sample builder with the chat format of `chat_format` and no length limit."""
    return SampleFactory(stack.text_tokenizer, stack.model.config.layout, SampleConfig(
        max_length=None, chat_format=chat_format.chat_format, chat_end_token=chat_format.chat_end_token,
        system_prompt=chat_format.system_prompt))


def image_slot(stack: InferenceStack, image_path: str, sample_id: str) -> ImageSlot:
    """The image as the model expects it: continuous features when it has a feature projector, codes otherwise."""
    from unimm.data.images import load_image

    visual = stack.visual_tokenizer
    pixels = visual.preprocess(load_image(image_path, sample_id)).to(next(visual.parameters()).device)
    with torch.no_grad():
        if stack.model.feature_projector is not None:
            return ImageSlot(features=visual.encode_features(pixels)[0].cpu(), image_key=image_path)
        return ImageSlot(codes={g: c[0].cpu() for g, c in visual.encode(pixels).items()}, image_key=image_path)


def chat_prompt(factory: SampleFactory, stack: InferenceStack, image_path: str | None, question: str,
                sample_id: str, history: Sequence[tuple[str, str]] = ()) -> Sample:
    """The chat-formatted prompt of one question (a `Sample` without targets). `history`: the earlier turns of the
    conversation as (question, answer), oldest first; the image goes with the first question."""
    from unimm.data.templates import ChatMessage

    parts: list = [image_slot(stack, image_path, sample_id), "\n"] if image_path is not None else []
    messages = []
    if factory.config.system_prompt:
        messages.append(ChatMessage("system", [factory.config.system_prompt]))
    for asked, answered in history:
        messages += [ChatMessage("user", parts + [asked]), ChatMessage("assistant", [answered])]
        parts = []
    messages.append(ChatMessage("user", parts + [question]))
    return factory.generation_prompt(messages, sample_id)


class _TextPieces:
    """Token ids of an answer, as they come, -> the new text each adds to the answer (its ids decoded without special
    tokens, stripped). Whitespace at the end and unfinished characters (U+FFFD) are held back until text follows."""

    HELD_BACK = re.compile(r"[\s\ufffd]+$")

    def __init__(self, text_tokenizer, on_text: Callable[[str], None]):
        self.text_tokenizer, self.on_text = text_tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        self.send(self.HELD_BACK.sub("", self.text_tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()))

    def send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):  # else hold on: a later decode may agree
            self.on_text(text[len(self.sent):])
            self.sent = text


def answer(stack: InferenceStack, sample: Sample, max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 1.0, top_p: float | None = None, seed: int = 0,
           on_text: Callable[[str], None] | None = None) -> str:
    """The model's answer to one prompt. `on_text`, if given, is called with each new piece of the answer as tokens
    are generated; the pieces concatenate to the returned answer whenever the tokenizer decodes each prefix of the
    ids to a prefix of the text (text that a later decode contradicts is held back, never sent)."""
    from unimm.llm.generation import generate_text

    device, model = stack.device, stack.model
    visual_codes = {g: c[None].to(device) for g, c in sample.visual_codes.items()} if sample.visual_codes else None
    features = torch.stack(sample.image_features).to(device, model.dtype) if sample.image_features else None
    pieces = None if on_text is None else _TextPieces(stack.text_tokenizer, on_text)
    (text,) = generate_text(model, stack.text_tokenizer, sample.input_ids[None].to(device), visual_codes=visual_codes,
                            image_features=features, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, seed=seed, on_token=pieces)
    text = text.strip()
    if pieces is not None:
        pieces.send(text)  # what was held back (a final U+FFFD)
    return text


def answer_questions(stack: InferenceStack, chat_args, seed: int = 0) -> list[dict]:
    """`[{image, question, answer}]` for the image/question pairs of a `ChatArguments`."""
    factory = chat_factory(stack, chat_args)
    results = []
    for i, (image, question) in enumerate(chat_args.pairs()):
        sample = chat_prompt(factory, stack, image, question, f"question{i}")
        limit = max_positions(stack.model)
        if limit and len(sample) >= limit:
            raise OptionError(f"questions[{i}]: its prompt has {len(sample)} positions (with the image), the model "
                              f"{limit} (max_position_embeddings): no room for an answer; shorten it")
        text = answer(stack, sample, chat_args.max_new_tokens, chat_args.do_sample, chat_args.temperature,
                      chat_args.top_p, seed)
        results.append({"image": image, "question": question, "answer": text})
    return results
