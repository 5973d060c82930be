"""Ask a trained UniMM model questions about images; prints one answer per question (and optionally JSON).

    python scripts/chat.py --model_path runs/finetune_merged --tokenizer_path runs/tokenizer \
        --images photo.png --questions "what colour is the shape?" "where is it?" --output_json answers.json

One image is asked every question; several images pair with the questions one to one; no image asks text-only
questions. The prompt uses the same chat format as finetuning (`--chat_format`, `--system_prompt`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from unimm.cli import ConfigError, parse_config, run_main
from unimm.train.arguments import ChatArguments, InferenceArguments
from unimm.utils.logging import setup_logging


def build_prompt(factory, visual, model, image_path: str | None, question: str, sample_id: str):
    """The chat-formatted prompt (a `Sample`) of one question, the image encoded as the model expects: continuous
    features when the model has a feature projector, codes otherwise."""
    import torch

    from unimm.data.images import load_image
    from unimm.data.sequence import ImageSlot, TokenIds
    from unimm.data.templates import ChatMessage

    parts: list = []
    if image_path is not None:
        pixels = visual.preprocess(load_image(image_path, sample_id)).to(next(visual.parameters()).device)
        with torch.no_grad():
            if model.feature_projector is not None:
                slot = ImageSlot(features=visual.encode_features(pixels)[0].cpu(), image_key=image_path)
            else:
                slot = ImageSlot(codes={g: c[0].cpu() for g, c in visual.encode(pixels).items()}, image_key=image_path)
        parts += [slot, "\n"]
    messages = []
    if factory.config.system_prompt:
        messages.append(ChatMessage("system", [factory.config.system_prompt]))
    messages.append(ChatMessage("user", parts + [question]))
    segments = factory.chat_format.segments(messages, sample_id, add_generation_prompt=True)
    # The builder makes training samples and insists on a target; give it one token past the prompt and drop it.
    end = TokenIds([factory.tokenizer.eos_token_id], supervise=True)
    sample = factory.builder.build([*segments, end], sample_id, "chat")
    sample.input_ids = sample.input_ids[:-1]
    sample.labels = sample.labels[:-1]
    if sample.visual_codes:
        sample.visual_codes = {g: c[:-1] for g, c in sample.visual_codes.items()}
    return sample


def main(argv: list[str] | None = None) -> list[dict]:
    infer_args, chat_args = parse_config((InferenceArguments, ChatArguments), sys.argv[1:] if argv is None else argv)
    setup_logging()
    import torch

    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.llm.generation import generate_text
    from unimm.train.build import load_inference_stack

    try:
        pairs = chat_args.pairs()
    except ValueError as err:  # mismatched --images / --questions: a command-line mistake
        raise ConfigError(str(err)) from err
    model, tokenizer, visual, device = load_inference_stack(infer_args)
    factory = SampleFactory(tokenizer, model.config.layout, SampleConfig(
        max_length=None, chat_format=chat_args.chat_format, chat_end_token=chat_args.chat_end_token,
        system_prompt=chat_args.system_prompt))
    results = []
    for i, (image, question) in enumerate(pairs):
        sample = build_prompt(factory, visual, model, image, question, f"question{i}")
        visual_codes = ({g: c[None].to(device) for g, c in sample.visual_codes.items()}
                        if sample.visual_codes else None)
        features = torch.stack(sample.image_features).to(device, model.dtype) if sample.image_features else None
        (answer,) = generate_text(
            model, tokenizer, sample.input_ids[None].to(device), visual_codes=visual_codes, image_features=features,
            max_new_tokens=chat_args.max_new_tokens, do_sample=chat_args.do_sample, temperature=chat_args.temperature,
            top_p=chat_args.top_p, seed=infer_args.seed,
        )
        answer = answer.strip()
        results.append({"image": image, "question": question, "answer": answer})
        print(f"Q: {question}\nA: {answer}")
    if chat_args.output_json:
        Path(chat_args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_main(main)
