"""Joint pretraining of a UniMM model: understanding (caption), generation (text-to-image) and text samples mixed
from a code cache, on the Hugging Face Trainer with DeepSpeed.

    deepspeed --num_gpus 8 scripts/pretrain.py --deepspeed configs/deepspeed/zero2.json \
        configs/pretrain/qwen2.5_1.5b_dualtoken.yaml --output_dir runs/pretrain

Configs: YAML files (positional) + `--key value` overrides of `unimm.train.args.ModelArguments`,
`VisualModulesConfig`, `DataArguments` and `UniMMTrainingArguments`; the resolved config is written to
output_dir. A run restarted with the same output_dir resumes from its newest complete checkpoint, skipping one
whose save was interrupted (`--auto_resume false` to start over). User errors are one line on stderr with exit
status 2 (`--debug` for the traceback).
"""

from __future__ import annotations

from unimm.cli.llava import LLAVA_HELP, translate_training_argv
from unimm.cli.llm_training import PRETRAIN_CONFIGS, train
from unimm.cli.program import ConfigProgram

CONFIG_TYPES = PRETRAIN_CONFIGS
PROGRAM = ConfigProgram("unimm-pretrain", CONFIG_TYPES, train, translate=translate_training_argv, epilog=LLAVA_HELP)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
