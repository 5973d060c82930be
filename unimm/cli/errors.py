"""Clean errors at the program boundary.

Every program ends in `run_main(main)`. A known user error (a missing or unreadable file, a file that does not
parse, an output directory that cannot be written, a bad config key or value, a folder that holds no model, a
code cache that does not match or is damaged, an image that cannot be read, too many bad samples) is printed as
one line, `<program>: error: <message>`, on stderr, and the program exits with status 2 and no traceback.
Anything else is a bug and keeps its traceback. `--debug` on the command line, or `UNIMM_DEBUG=1` in the environment, re-raises
user errors too, with their full traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# The errors and their one-line descriptions live on the utils floor, where library code (the demo app, trainers)
# can reach them; re-exported here for programs.
from unimm.utils.errors import ConfigError, UserError, describe_user_error, is_user_error

__all__ = ["ConfigError", "config_errors", "describe_user_error", "is_user_error", "parse_config", "run_main"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "UNIMM_DEBUG"
EXIT_USER_ERROR = 2


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
                 epilog: str | None = None) -> tuple[Any, ...]:
    """`unimm.utils.config.parse_config`, with every rejection raised as `ConfigError`, so programs report it
    as a user error: unknown YAML keys, values a config's `__post_init__` refuses, and argparse's own errors
    (`argument --max_steps: invalid int value: 'abc'`, unknown flags), whose usage text is dropped. YAML syntax
    errors keep their type (reported with file, line and column). `--help` behaves as usual."""
    from unimm.utils.config import parse_config as _parse_config

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), config_errors():
            return _parse_config(dataclass_types, argv, epilog=epilog)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        message = lines[-1].split("error:", 1)[1].strip() if lines else captured.getvalue().strip()
        message += _yaml_origin(message, sys.argv[1:] if argv is None else argv)
        captured = io.StringIO()  # already summarised
        raise ConfigError(f"invalid command line: {message}") from None
    finally:
        sys.stderr.write(captured.getvalue())  # warnings printed while parsing still reach the user


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Values that a config's own checks refuse (`ValueError`, `TypeError`, `KeyError`, e.g. from `__post_init__` or
    from `TrainingArguments.finalize`) become a `ConfigError`, reported as a user error."""
    try:
        yield
    except (UserError, OSError):
        raise
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"invalid configuration: {message}") from err


def _yaml_origin(message: str, argv: Sequence[str]) -> str:
    """` (set in FILE)` when argparse rejects a value that came from a YAML file rather than the command line."""
    from unimm.utils.config import config_origins

    match = re.search(r"argument --([A-Za-z0-9_]+)", message)
    if match is None or any(a == f"--{match.group(1)}" or a.startswith(f"--{match.group(1)}=") for a in argv):
        return ""
    try:
        origin = config_origins(argv).get(match.group(1))
    except Exception:  # the YAML itself is broken: that error is reported on its own
        return ""
    return f" (set in {origin})" if origin else ""


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Run a program's `main(argv)`, reporting known user errors as one line on stderr with exit status 2.

    `--debug` is removed from `argv` before `main` sees it; with it (or `UNIMM_DEBUG=1`) user errors are raised
    with their traceback like any other exception."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    prog = prog or Path(sys.argv[0]).name
    try:
        result = main(args)
    except Exception as err:  # noqa: BLE001 - classified right below; everything else re-raises unchanged
        if debug or not is_user_error(err):
            raise
        print(f"{prog}: error: {describe_user_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    from unimm.utils.distributed import shutdown

    shutdown()  # a finished multi-rank program: every rank leaves the process group together
    return result
