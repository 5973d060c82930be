"""`unimm-eval-tokenizer`: evaluate a trained visual tokenizer (PSNR, SSIM, codebook use, semantic preservation,
rFID with local Inception weights; with --zero_shot_model/--zero_shot_dataset two zero-shot top-1 figures: a SigLIP
on the reconstructions, and DualToken's own metric on its pooled quantised semantic features against the SigLIP
text tower) and write the metrics as JSON plus an input | reconstruction grid.

    unimm-eval-tokenizer --model_path runs/vqrae-tiny/model --dataset sample_photos --image_size 32 \
        --output_json runs/vqrae-tiny/eval.json
"""

from __future__ import annotations

from typing import Any

from unimm.cli.program import ConfigProgram
from unimm.inference.tokenizer_eval import TokenizerEvalArguments


def evaluate(args: TokenizerEvalArguments) -> dict[str, Any]:
    from unimm.inference.tokenizer_eval import evaluate as evaluate_tokenizer
    from unimm.utils.logging import setup_logging

    setup_logging()
    return evaluate_tokenizer(args)


PROGRAM = ConfigProgram("unimm-eval-tokenizer", (TokenizerEvalArguments,), evaluate)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main

if __name__ == "__main__":
    main()
