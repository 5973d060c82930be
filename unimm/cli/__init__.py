"""The program layer of UniMM: what `scripts/*.py` share at their boundary with the user (argument parsing that
reports config mistakes as such, and one wrapper that turns known user errors into one line on stderr)."""

from unimm.cli.errors import ConfigError, describe_user_error, is_user_error, parse_config, run_main

__all__ = ["ConfigError", "describe_user_error", "is_user_error", "parse_config", "run_main"]
