"""`ConfigProgram`: the shape every config-driven program shares. A program module names its configs and a body,

    PROGRAM = ConfigProgram("unimm-chat", (InferenceArguments, ChatArguments), chat)
    make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main

and gets `make_parser()` (the argparse parser, for `--help` and documentation), `parse_args(argv)` (YAML + CLI into
the configs, no side effects; config mistakes raise `ConfigError`) and `main(argv=None)`, which runs
`body(*configs)` inside `run_main` (user errors: one line on stderr, exit status 2). `translate` rewrites the
argument list before parsing (the training programs' LLaVA-1.5 flags), `epilog` ends `--help`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unimm.cli.errors import parse_config, run_main
from unimm.utils.config import make_config_parser


@dataclass(frozen=True)
class ConfigProgram:
    name: str
    config_types: tuple[type, ...]
    body: Callable[..., Any]
    translate: Callable[[list[str]], list[str]] | None = None
    epilog: str | None = None

    def make_parser(self):
        return make_config_parser(self.config_types, prog=self.name, epilog=self.epilog)

    def parse_args(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        argv = list(sys.argv[1:] if argv is None else argv)
        if self.translate is not None:
            argv = self.translate(argv)
        return parse_config(self.config_types, argv, epilog=self.epilog)

    def main(self, argv: Sequence[str] | None = None) -> Any:
        return run_main(lambda args: self.body(*self.parse_args(args)), argv)
