"""Run a visual tokenizer over a dataset's images once and write the codes to a code cache (Arrow shards).

    accelerate launch --num_processes 8 scripts/pretokenize.py --data pairs.jsonl \
        --tokenizer_path runs/tokenizer --output_dir cache/pairs
    python scripts/pretokenize.py --data llava.json --data_format llava --image_folder images/ ...

Rerun the same command to resume an interrupted run (finished shards are skipped).
"""

from unimm.data.code_cache import PretokenizeConfig, run_pretokenize
from unimm.utils.config import parse_config
from unimm.utils.logging import setup_logging

if __name__ == "__main__":
    setup_logging()
    (config,) = parse_config((PretokenizeConfig,))
    run_pretokenize(config)
