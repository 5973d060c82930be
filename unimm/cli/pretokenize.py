"""Run a visual tokenizer over a dataset's images once and write the codes to a code cache (Arrow shards).

    accelerate launch --num_processes 8 scripts/pretokenize.py --data pairs.jsonl \
        --visual_tokenizer_path runs/tokenizer --output_dir cache/pairs
    unimm-pretokenize --data llava.json --data_format llava --image_folder images/ ...

Rerun the same command to resume an interrupted run (finished shards are skipped), or to repair a finished cache:
only shards whose file no longer matches its recorded checksum are re-encoded.
"""

from __future__ import annotations

from typing import Any

from unimm.cli.program import ConfigProgram
from unimm.data.pretokenize import PretokenizeConfig


def pretokenize(config: PretokenizeConfig) -> dict[str, Any] | None:
    from unimm.data.pretokenize import run_pretokenize
    from unimm.utils.logging import setup_logging

    setup_logging()
    return run_pretokenize(config)


CONFIG_TYPES = (PretokenizeConfig,)
PROGRAM = ConfigProgram("unimm-pretokenize", CONFIG_TYPES, pretokenize)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main
