"""Ask a trained UniMM model questions about images; prints one answer per question (and optionally JSON).

    unimm-chat --model_path runs/finetune_merged --visual_tokenizer_path runs/tokenizer \
        --images photo.png --questions "what colour is the shape?" "where is it?" --output_json answers.json

One image is asked every question; several images pair with the questions one to one; no image asks text-only
questions. The prompt uses the same chat format as finetuning (`--chat_format`, `--system_prompt`).
"""

from __future__ import annotations

import json
from pathlib import Path

from unimm.cli.errors import ConfigError
from unimm.cli.program import ConfigProgram
from unimm.inference.args import ChatArguments, InferenceArguments


def chat(infer_args: InferenceArguments, chat_args: ChatArguments) -> list[dict]:
    from unimm.inference.chat import answer_questions
    from unimm.inference.stack import load_inference_stack
    from unimm.utils.logging import setup_logging

    setup_logging()
    try:
        chat_args.pairs()
    except ValueError as err:  # mismatched --images / --questions: a command-line mistake
        raise ConfigError(str(err)) from err
    results = answer_questions(load_inference_stack(infer_args), chat_args, seed=infer_args.seed)
    for row in results:
        print(f"Q: {row['question']}\nA: {row['answer']}")
    if chat_args.output_json:
        Path(chat_args.output_json).write_text(json.dumps(results, indent=2))
    return results


CONFIG_TYPES = (InferenceArguments, ChatArguments)
PROGRAM = ConfigProgram("unimm-chat", CONFIG_TYPES, chat)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
