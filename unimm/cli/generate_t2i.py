"""Text-to-image generation with a trained UniMM model: one PNG per prompt, a grid and prompts.json.

    unimm-generate-t2i --model_path runs/pretrain --visual_tokenizer_path runs/tokenizer \
        --prompts "a red circle on the left" "a blue square" --cfg_scale 3 --output_dir samples

Sampling: classifier-free guidance (`--cfg_scale`, 0 = off; `--negative_prompt` in place of the unconditional
branch), `--temperature` (0 = greedy), `--top_k`, `--top_p`,
`--seed`, `--batch_size`; `--rerank_samples N` draws N sampled candidates per prompt besides that image and keeps
the one the model itself scores best (caption NLL + image NLL, `unimm.inference.rerank`; rerank.json says which);
prompts from `--prompts` and/or `--prompts_file` (one per line).
"""

from __future__ import annotations

import json
from pathlib import Path

from unimm.cli.errors import ConfigError
from unimm.cli.program import ConfigProgram
from unimm.inference.args import GenerateArguments, InferenceArguments, check_prompt_lengths, max_positions


def generate_t2i(infer_args: InferenceArguments, gen_args: GenerateArguments) -> list[Path]:
    from unimm.inference.stack import load_inference_stack
    from unimm.inference.t2i import generate_pil_images, write_images
    from unimm.utils.logging import setup_logging

    setup_logging()
    try:
        prompts = gen_args.all_prompts()
    except ValueError as err:  # no prompts given: a command-line mistake
        raise ConfigError(str(err)) from err
    stack = load_inference_stack(infer_args)
    check_prompt_lengths(prompts, stack.text_tokenizer, max_positions(stack.model),
                         stack.visual_tokenizer.num_positions + 3)  # the image and <|boi|>, <|eoi|>, BOS
    Path(gen_args.output_dir).mkdir(parents=True, exist_ok=True)  # an unwritable directory fails before sampling
    choices: list = []
    images = generate_pil_images(stack, prompts, gen_args, seed=infer_args.seed, choices=choices)
    files = write_images(images, prompts, gen_args.output_dir, gen_args.grid_columns)
    if gen_args.rerank_samples:  # which candidate each prompt kept, and why
        (Path(gen_args.output_dir) / "rerank.json").write_text(json.dumps(
            {"rerank_samples": gen_args.rerank_samples, "rerank_temperature": gen_args.rerank_temperature,
             "choices": [c.to_dict() for c in choices]}, indent=1))
        kept = sum(c.chosen == 0 for c in choices)
        print(f"rerank: kept the configured decoding's image for {kept} of {len(choices)} prompts, a sampled "
              f"candidate for the rest ({gen_args.output_dir}/rerank.json)")
    print(f"wrote {len(files)} images and grid.png to {gen_args.output_dir}")
    return files


CONFIG_TYPES = (InferenceArguments, GenerateArguments)
PROGRAM = ConfigProgram("unimm-generate-t2i", CONFIG_TYPES, generate_t2i)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
