"""Run a visual tokenizer over a dataset's images once and write the codes to a code cache (Arrow shards).

    accelerate launch --num_processes 8 scripts/pretokenize.py --data pairs.jsonl \
        --tokenizer_path runs/tokenizer --output_dir cache/pairs
    python scripts/pretokenize.py --data llava.json --data_format llava --image_folder images/ ...

Rerun the same command to resume an interrupted run (finished shards are skipped), or to repair a finished cache:
only shards whose file no longer matches its recorded checksum are re-encoded.
"""

from __future__ import annotations

from typing import Any

from unimm.cli import parse_config, run_main
from unimm.data.code_cache import PretokenizeConfig, run_pretokenize
from unimm.utils.logging import setup_logging


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    (config,) = parse_config((PretokenizeConfig,), argv)
    setup_logging()
    return run_pretokenize(config)


if __name__ == "__main__":
    run_main(main)
