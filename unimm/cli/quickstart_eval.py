"""`unimm-quickstart-eval`: the shapes-specific steps of `scripts/quickstart.sh` (`unimm.data.toy.quickstart`).

    python scripts/quickstart_eval.py prepare --out runs/quickstart
    python scripts/quickstart_eval.py tokenizer --out runs/quickstart --tokenizer_path runs/quickstart/tokenizer/model
    python scripts/quickstart_eval.py generation --out runs/quickstart --generated_dir runs/quickstart/generated
    python scripts/quickstart_eval.py qa --out runs/quickstart --answers_json runs/quickstart/answers.json
    python scripts/quickstart_eval.py cfg --out runs/quickstart --model_path runs/quickstart/finetune \
        --tokenizer_path runs/quickstart/tokenizer/model

Each scoring command prints `<name> accuracy: <number>` lines (generation: seen captions, then `held-out generation
accuracy`) and adds its figures to `<out>/scores.json`; `cfg` prints the held-out accuracy by guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence

from unimm.cli.errors import run_main
from unimm.data.toy.quickstart import make_parser

__all__ = ["main", "make_parser"]


def _run(argv: list[str]) -> float | None:
    args = make_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> float | None:
    return run_main(_run, argv)
