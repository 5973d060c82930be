"""`unimm-quickstart-eval`: the shapes-specific steps of `scripts/quickstart.sh` (`prepare`, `tokenizer`,
`generation`, `qa`, `cfg`); the steps, their commands and what they print are in `unimm.cli.quickstart`."""

from __future__ import annotations

from collections.abc import Sequence

from unimm.cli.errors import run_main
from unimm.cli.quickstart import make_parser

__all__ = ["main", "make_parser"]


def _run(argv: list[str]) -> float | None:
    args = make_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> float | None:
    return run_main(_run, argv)
