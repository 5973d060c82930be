"""Joint pretraining of a UniMM model: understanding (caption), generation (text-to-image) and text samples mixed
from a code cache, on the Hugging Face Trainer with DeepSpeed.

    deepspeed --num_gpus 8 scripts/pretrain.py --deepspeed configs/deepspeed/zero2.json \
        configs/pretrain/qwen2.5_1.5b_dualtoken.yaml --output_dir runs/pretrain

Configs: YAML files (positional) + `--key value` overrides of `unimm.train.arguments.ModelArguments`,
`DataArguments` and `UniMMTrainingArguments`; the resolved config is written to output_dir. A run restarted with
the same output_dir resumes from its newest complete checkpoint, skipping one whose save was interrupted
(`--auto_resume false` to start over). User errors are one line on stderr with exit status 2 (`--debug`
for the traceback).
"""

from __future__ import annotations

import sys

from unimm.cli import parse_config, run_main
from unimm.train.arguments import DataArguments, ModelArguments, UniMMTrainingArguments
from unimm.utils.logging import setup_logging

CONFIG_TYPES = (ModelArguments, DataArguments, UniMMTrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_config(CONFIG_TYPES, sys.argv[1:] if argv is None else argv)
    setup_logging()
    from unimm.train.llm_trainer import run_training

    run_training(model_args, data_args, training_args)


if __name__ == "__main__":
    run_main(main)
