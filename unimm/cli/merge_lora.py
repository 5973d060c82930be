"""Fold a LoRA finetune checkpoint (adapter + fully trained modules) into its base UniMM model and write a plain
model that `UniMMForCausalLM.from_pretrained` loads without peft.

    unimm-merge-lora --adapter_path runs/finetune/checkpoint-500 --output_dir runs/finetune_merged

The base model is the one recorded in the checkpoint's adapter_config.json unless `--base_model_path` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unimm.cli.program import ConfigProgram
from unimm.utils.config import config_field


@dataclass
class MergeArguments:
    adapter_path: str = config_field(None, "A LoRA checkpoint (adapter_config.json inside).")
    output_dir: str = config_field(None, "Where the merged model and text tokenizer go.")
    base_model_path: str | None = config_field(None, "Base UniMM model; default: base_model_name_or_path of the "
                                               "adapter config.")

    def __post_init__(self) -> None:
        if not self.adapter_path or not self.output_dir:
            raise ValueError("adapter_path and output_dir are required")


def merge(args: MergeArguments) -> Path:
    from unimm.train.llm.lora import merge_lora
    from unimm.utils.logging import setup_logging

    setup_logging()
    path = merge_lora(args.adapter_path, args.output_dir, args.base_model_path)
    print(f"merged model written to {path}")
    return path


CONFIG_TYPES = (MergeArguments,)
PROGRAM = ConfigProgram("unimm-merge-lora", CONFIG_TYPES, merge)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
