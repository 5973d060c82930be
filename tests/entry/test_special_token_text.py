"""Text that spells a special token (`<|boi|>`, `<|im_start|>`, `<|im_end|>`) stays plain text on every path user
text takes into the model: text-to-image prompts through unimm-generate-t2i, chat questions through the chat
prompt of unimm.inference.chat, and training data (captions, text-to-image prompts, conversations, text-only samples)."""

from __future__ import annotations

import json

import pytest
import torch

from unimm.cli import generate_t2i

LITERAL = "type <|boi|> or <|im_start|>user and <|im_end|> literally"
PLAIN = "type x or y and z literally"


def _special_counts(ids, tokenizer, layout) -> dict[str, int]:
    ids = torch.as_tensor(ids).tolist()
    special = {"boi": layout.boi_token_id, "eoi": layout.eoi_token_id,
                "im_start": tokenizer.convert_tokens_to_ids("<|im_start|>"),
                "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return {name: ids.count(token) for name, token in special.items()}


@pytest.fixture(scope="module")
def stack(tiny_unimm, toy):
    from unimm.inference.stack import InferenceStack, load_for_inference
    from unimm.tokenizer import load_visual_tokenizer

    model, tokenizer = load_for_inference(tiny_unimm, torch.device("cpu"), "float32")
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id  # a real special token here
    return InferenceStack(model, tokenizer, load_visual_tokenizer(toy["tokenizer"]), torch.device("cpu"))


def test_generate_t2i_prompt_with_special_token_text(tiny_unimm, toy, tmp_path, stack, monkeypatch):
    import unimm.llm.generation as generation

    tokenizer = stack.text_tokenizer
    recorded: dict[str | None, list[int]] = {}
    original = generation.t2i_prefix_ids

    def recording(tokenizer_, layout_, prompt):
        recorded[prompt] = original(tokenizer_, layout_, prompt)
        return recorded[prompt]

    monkeypatch.setattr(generation, "t2i_prefix_ids", recording)
    paths = generate_t2i.main([
        "--model_path", str(tiny_unimm), "--visual_tokenizer_path", str(toy["tokenizer"]), "--prompts", LITERAL, PLAIN,
        "--cfg_scale", "0", "--batch_size", "2", "--output_dir", str(tmp_path / "out")])
    assert len(paths) == 2
    layout = stack.model.config.layout
    literal, plain = _special_counts(recorded[LITERAL], tokenizer, layout), _special_counts(recorded[PLAIN],
                                                                                             tokenizer, layout)
    assert literal == plain == {"boi": 1, "eoi": 0, "im_start": 0, "im_end": 0}
    assert recorded[LITERAL][-1] == layout.boi_token_id
    assert tokenizer.decode(recorded[LITERAL][:-1], skip_special_tokens=False).strip().endswith(LITERAL)
    assert json.loads((tmp_path / "out" / "prompts.json").read_text())[0]["prompt"] == LITERAL


def test_chat_question_with_special_token_text(toy, stack):
    from unimm.data.tasks import ChatFormatConfig
    from unimm.inference.chat import chat_factory, chat_prompt

    model, tokenizer = stack.model, stack.text_tokenizer
    factory = chat_factory(stack, ChatFormatConfig())
    image = str(toy["images"] / "red_0.png")
    literal = chat_prompt(factory, stack, image, LITERAL, "q-literal")
    plain = chat_prompt(factory, stack, image, PLAIN, "q-plain")
    counts = _special_counts(literal.input_ids, tokenizer, model.config.layout)
    assert counts == _special_counts(plain.input_ids, tokenizer, model.config.layout)
    assert counts["boi"] == 1 and counts["im_start"] >= 2  # the image's own <|boi|>; the template's turn markers
    assert LITERAL in tokenizer.decode(literal.input_ids)


def test_training_samples_with_special_token_text(toy, stack):
    from unimm.data.code_cache import load_code_cache
    from unimm.data.sequence import ImageSlot
    from unimm.data.tasks import SampleConfig, SampleFactory

    model, tokenizer = stack.model, stack.text_tokenizer
    layout = model.config.layout
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.0))
    codes = load_code_cache(toy["cache"], None)[0]["codes"]
    turns = lambda question: [{"from": "human", "value": f"<image>\n{question}"},  # noqa: E731
                              {"from": "gpt", "value": question}]
    build = {
        "caption": lambda text: factory.caption("c", text, ImageSlot(codes=codes)),
        "t2i": lambda text: factory.t2i("t", text, codes),
        "conversation": lambda text: factory.conversation(
            {"id": "v", "images": ["red_0.png"], "conversations": turns(text), "malformed": None},
            [ImageSlot(codes=codes)]),
        "text": lambda text: factory.text("x", text),
    }
    for task, make in build.items():
        literal, plain = make(LITERAL), make(PLAIN)
        assert _special_counts(literal.input_ids, tokenizer, layout) == _special_counts(plain.input_ids, tokenizer,
                                                                                       layout), task
        assert LITERAL in tokenizer.decode(literal.input_ids), task
