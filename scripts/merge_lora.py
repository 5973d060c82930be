"""Fold a LoRA finetune checkpoint (adapter + fully trained modules) into its base UniMM model and write a plain
model that `UniMMForCausalLM.from_pretrained` loads without peft.

    python scripts/merge_lora.py --adapter_path runs/finetune/checkpoint-500 --output_dir runs/finetune_merged

The base model is the one recorded in the checkpoint's adapter_config.json unless `--base_model_path` is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from unimm.cli import parse_config, run_main
from unimm.utils.logging import setup_logging


@dataclass
class MergeArguments:
    adapter_path: str = field(default=None, metadata={"help": "A LoRA checkpoint (adapter_config.json inside)."})
    output_dir: str = field(default=None, metadata={"help": "Where the merged model and text tokenizer go."})
    base_model_path: str | None = field(default=None, metadata={
        "help": "Base UniMM model; default: base_model_name_or_path of the adapter config."})

    def __post_init__(self) -> None:
        if not self.adapter_path or not self.output_dir:
            raise ValueError("adapter_path and output_dir are required")


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_config((MergeArguments,), sys.argv[1:] if argv is None else argv)
    setup_logging()
    from unimm.train.lora import merge_lora

    path = merge_lora(args.adapter_path, args.output_dir, args.base_model_path)
    print(f"merged model written to {path}")


if __name__ == "__main__":
    run_main(main)
