"""LLaVA-style instruction tuning of a UniMM model on LLaVA-format conversation JSON, full or LoRA.

    deepspeed --num_gpus 8 scripts/finetune.py --deepspeed configs/deepspeed/zero2.json \
        configs/finetune/llava_lora.yaml --model_path runs/pretrain --output_dir runs/finetune

Images come from a code cache (`conversation_code_cache` / `code_cache`) or are read from `image_folder` and
encoded on the fly by the visual tokenizer (`visual_tokenizer_path`) into continuous features. With `use_lora`
every checkpoint holds the adapter plus the fully trained modules (new token rows, visual heads, projector) and
resumes; `unimm-merge-lora` folds it into a plain model. Freeze switches: train_llm, train_new_embeddings,
train_visual_heads, train_projector.
"""

from __future__ import annotations

from unimm.cli.llava import LLAVA_HELP, translate_training_argv
from unimm.cli.llm_training import FINETUNE_CONFIGS, train
from unimm.cli.program import ConfigProgram

CONFIG_TYPES = FINETUNE_CONFIGS
PROGRAM = ConfigProgram("unimm-finetune", CONFIG_TYPES, train, translate=translate_training_argv, epilog=LLAVA_HELP)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
