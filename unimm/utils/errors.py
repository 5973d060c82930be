"""Errors that mean "your input is wrong", as opposed to a bug: programs report them as one line on stderr with
exit status 2 and no traceback (`unimm.cli.errors.run_main`). Library code raises subclasses of `UserError`
(usually also of the built-in type callers already catch, e.g. `ValueError`) with a message that names the
file, sample id or config key, and says what to do."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error in the user's input, configuration or environment, with a message that says which and why."""


class InputFileError(UserError, ValueError):
    """A data or config file that cannot be parsed; the message gives `file:line:column`."""


def invalid_json(path: str | os.PathLike, err: json.JSONDecodeError, what: str = "JSON") -> InputFileError:
    """`err` from parsing `path`, as an error naming the file, line and column."""
    return InputFileError(f"{os.fspath(path)}:{err.lineno}:{err.colno}: invalid {what}: {err.msg}")


class OptionError(UserError, ValueError):
    """Options that cannot work together (e.g. a task weight without the data it needs); the message names them."""


class ModelFolderError(UserError, ValueError):
    """A folder given as a model or tokenizer that does not hold one (or holds another kind of model)."""


@contextmanager
def model_folder(option: str, path: str | os.PathLike | None, what: str) -> Iterator[None]:
    """Report a failure to load `what` from the folder the user gave as `option` as a `ModelFolderError` naming
    both, instead of whatever the loader raised deep inside (a config `ValueError`, a missing key ...)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename is not None:
            raise  # a permission or disk problem: reported as such
        detail = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ModelFolderError(f"{option}={os.fspath(path) if path is not None else None}: cannot load {what} "
                               f"from this folder: {detail}") from err


def locate_json_error(path: str | os.PathLike) -> InputFileError | None:
    """Parse the `.json` / `.jsonl` file `path` with the standard library and return an error naming the file,
    line and column of its first syntax error (None if it parses). For readers that report only "parse error in
    row N" (Arrow's JSON reader); called once they failed, so the extra pass costs nothing on good data."""
    path = os.fspath(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.lower().endswith(".jsonl"):
            try:
                json.load(f)
            except json.JSONDecodeError as err:
                return invalid_json(path, err)
            return None
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return InputFileError(f"{path}:{line_number}:{err.colno}: invalid JSON Lines record: {err.msg}")
    return None


@contextmanager
def json_source_errors(source: str | os.PathLike) -> Iterator[None]:
    """Around a `datasets` JSON read of `source` (a file or glob): a generation failure caused by a syntax error
    is re-raised as the `InputFileError` naming file, line and column."""
    try:
        yield
    except Exception as err:
        from glob import glob

        if type(err).__module__.startswith("datasets") and str(source).lower().endswith((".json", ".jsonl")):
            for file in sorted(glob(os.fspath(source))) or [os.fspath(source)]:
                located = locate_json_error(file) if os.path.isfile(file) else None
                if located is not None:
                    raise located from err
        raise


def require_path(option: str, value: str | os.PathLike) -> None:
    """A `FileNotFoundError` naming `option` when `value` (no glob pattern) does not exist, before a reader
    guesses a format from the missing path's name."""
    text = os.fspath(value)
    if not any(ch in text for ch in "*?[") and not os.path.exists(text):
        raise FileNotFoundError(f"{option}={text}: no such file or folder")
