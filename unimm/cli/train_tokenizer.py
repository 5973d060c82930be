"""`unimm-train-tokenizer`: train a visual tokenizer (VQRAE stage 1/2, DualToken in one run or the reference's
stages 0/1/2 chained by --model_path, l-DeTok options, decoder-only finetune).

    unimm-train-tokenizer configs/tokenizer/vqrae-tiny.yaml --output_dir runs/vqrae-tiny
    accelerate launch --num_processes 8 scripts/train_tokenizer.py \
        configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml --encoder_path /models/siglip2-so400m-patch16-256 \
        --lpips_vgg_path /models/vgg16.pth --lpips_lin_path /models/lpips/vgg.pth \
        --dataset /data/imagenet/train --output_dir runs/stage1

Configs: YAML files (positional) + `--key value` overrides of `unimm.train.tokenizer.args` and
`ReconstructionLossConfig`; the resolved config is written to output_dir. `--auto_resume true` continues from the
newest complete checkpoint in output_dir (its logs are cut back to that step). User errors are one line on stderr
with exit status 2 (`--debug` for the traceback).
"""

from __future__ import annotations

from typing import Any

from unimm.cli.program import ConfigProgram
from unimm.train.tokenizer.args import CONFIG_TYPES


def train(*configs: Any) -> dict[str, Any]:
    """Join the process group of a launch (so logging knows this rank), then train; returns the run's summary."""
    from unimm.train.tokenizer.loop import train_tokenizer
    from unimm.utils.logging import setup_logging
    from unimm.utils.runtime import init_distributed

    init_distributed()
    setup_logging()
    return train_tokenizer(*configs)


PROGRAM = ConfigProgram("unimm-train-tokenizer", CONFIG_TYPES, train)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main

if __name__ == "__main__":
    main()
