"""The program layer of UniMM: one module per program (`unimm.cli.<program>`, each with `make_parser()` and
`main(argv=None)`, installed as `unimm-<program>` console scripts; `scripts/*.py` call them), and what they share at
their boundary with the user: argument parsing that reports config mistakes as such, and one wrapper that turns
known user errors into one line on stderr."""

from unimm.cli.errors import ConfigError, config_errors, describe_user_error, is_user_error, parse_config, run_main

__all__ = ["ConfigError", "config_errors", "describe_user_error", "is_user_error", "parse_config", "run_main"]
