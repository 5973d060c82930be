"""What `unimm-pretrain` and `unimm-finetune` share: their configs, and the program body that prepares the runtime
(process group, devices) from the parsed configs and trains."""

from __future__ import annotations

from typing import Any

from unimm.cli.errors import config_errors
from unimm.train.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    UniMMTrainingArguments,
    VisualModulesConfig,
)

PRETRAIN_CONFIGS = (ModelArguments, VisualModulesConfig, DataArguments, UniMMTrainingArguments)
FINETUNE_CONFIGS = (ModelArguments, VisualModulesConfig, DataArguments, LoraArguments, UniMMTrainingArguments)


def train(model_args: ModelArguments, modules: VisualModulesConfig, data_args: DataArguments, *rest: Any) -> Any:
    """`rest` is `(training_args,)` or `(lora_args, training_args)`. Parsing had no side effects: the process group
    and devices are set up here, then `run_training` trains."""
    from unimm.train.llm.trainer import run_training
    from unimm.utils.logging import setup_logging
    from unimm.utils.runtime import prepare_training_arguments

    *lora, training_args = rest
    with config_errors():
        prepare_training_arguments(training_args)
    setup_logging()  # after the process group exists, so that only rank 0 logs INFO
    return run_training(model_args, modules, data_args, training_args, lora[0] if lora else None)
