"""The visual-tokenizer trainer: configs (`args`), images (`data`), model and optimisers (`build`), the loop
(`loop`: setup / fit / validate / finish) and its checkpoints (`state`). The program is `unimm.cli.train_tokenizer`."""

from unimm.train.tokenizer.args import (
    CONFIG_TYPES,
    TokenizerDataArguments,
    TokenizerModelArguments,
    TokenizerTrainingArguments,
)
from unimm.train.tokenizer.loop import TokenizerRun, fit, setup, train_tokenizer, validate

__all__ = [
    "CONFIG_TYPES",
    "TokenizerDataArguments",
    "TokenizerModelArguments",
    "TokenizerRun",
    "TokenizerTrainingArguments",
    "fit",
    "setup",
    "train_tokenizer",
    "validate",
]
