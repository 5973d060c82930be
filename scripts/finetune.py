"""LLaVA-style instruction tuning of a UniMM model on LLaVA-format conversation JSON, full or LoRA.

    deepspeed --num_gpus 8 scripts/finetune.py --deepspeed configs/deepspeed/zero2.json \
        configs/finetune/llava_lora.yaml --model_path runs/pretrain --output_dir runs/finetune

Images come from a code cache (`conversation_code_cache` / `code_cache`) or are read from `image_folder` and
encoded on the fly by the visual tokenizer (`tokenizer_path`) into continuous features. With `use_lora` every
checkpoint holds the adapter plus the fully trained modules (new token rows, visual heads, projector) and resumes;
`scripts/merge_lora.py` folds it into a plain model. Freeze switches: train_llm, train_new_embeddings,
train_visual_heads, train_projector.
"""

from __future__ import annotations

import sys

from unimm.cli import parse_config, run_main
from unimm.train.arguments import DataArguments, LoraArguments, ModelArguments, UniMMTrainingArguments
from unimm.utils.logging import setup_logging

CONFIG_TYPES = (ModelArguments, DataArguments, LoraArguments, UniMMTrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, lora_args, training_args = parse_config(CONFIG_TYPES,
                                                                   sys.argv[1:] if argv is None else argv)
    setup_logging()
    from unimm.train.llm_trainer import run_training

    run_training(model_args, data_args, training_args, lora_args)


if __name__ == "__main__":
    run_main(main)
