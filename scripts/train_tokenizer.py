#!/usr/bin/env python
"""Train a visual tokenizer (VQRAE stage 1/2, DualToken, l-DeTok options, decoder-only finetune).

    python scripts/train_tokenizer.py configs/tokenizer/vqrae-tiny.yaml --output_dir runs/vqrae-tiny
    accelerate launch --num_processes 8 scripts/train_tokenizer.py \
        configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml --encoder_path /models/siglip2-so400m-patch16-256 \
        --lpips_vgg_path /models/vgg16.pth --lpips_lin_path /models/lpips/vgg.pth \
        --dataset /data/imagenet/train --output_dir runs/stage1

Any YAML key can be overridden on the command line (`--max_steps 100`); `--resume auto` continues from the
newest complete checkpoint in the output directory (its logs are cut back to that step). The resolved config
is written to the run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import PartialState

from unimm.cli import parse_config, run_main
from unimm.tokenizer.losses import ReconstructionLossConfig
from unimm.train.tokenizer_trainer import (
    TokenizerDataArguments,
    TokenizerModelArguments,
    TokenizerTrainingArguments,
    train_tokenizer,
)
from unimm.utils.logging import setup_logging

CONFIG_TYPES = (TokenizerModelArguments, TokenizerDataArguments, ReconstructionLossConfig, TokenizerTrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_config(CONFIG_TYPES, argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    # Start the process group first so logging knows this process's rank (INFO on rank 0 only).
    PartialState(cpu=not torch.cuda.is_available())
    setup_logging()
    return train_tokenizer(*parse_args(argv))


if __name__ == "__main__":
    run_main(main)
