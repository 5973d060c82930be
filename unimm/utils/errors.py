"""Errors that mean "your input is wrong", as opposed to a bug: programs report them as one line on stderr with
exit status 2 and no traceback (`unimm.cli.errors.run_main`). Library code raises subclasses of `UserError`
(usually also of the built-in type callers already catch, e.g. `ValueError`) with a message that names the
file, sample id or config key, and says what to do."""

from __future__ import annotations

import json
import os


class UserError(Exception):
    """An error in the user's input, configuration or environment, with a message that says which and why."""


class InputFileError(UserError, ValueError):
    """A data or config file that cannot be parsed; the message gives `file:line:column`."""


def invalid_json(path: str | os.PathLike, err: json.JSONDecodeError, what: str = "JSON") -> InputFileError:
    """`err` from parsing `path`, as an error naming the file, line and column."""
    return InputFileError(f"{os.fspath(path)}:{err.lineno}:{err.colno}: invalid {what}: {err.msg}")
