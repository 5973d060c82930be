"""Errors that mean "your input is wrong", as opposed to a bug: programs report them as one line on stderr with
exit status 2 and no traceback (`unimm.cli.errors.run_main`). Library code raises subclasses of `UserError`
(usually also of the built-in type callers already catch, e.g. `ValueError`) with a message that names the
file, sample id or config key, and says what to do. `is_user_error` tells these (and the OS, JSON, YAML and disk
errors that also mean bad input) from bugs, `describe_user_error` writes the one line; both live here, on the
lowest floor, so that library code (the demo app) can report errors the way programs do without importing them."""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath

# OSErrors that describe the user's files or machine, not a bug: reported in one line.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENOENT, errno.ENAMETOOLONG}


class UserError(Exception):
    """An error in the user's input, configuration or environment, with a message that says which and why."""


class ConfigError(UserError, ValueError):
    """A config key or value that a program's dataclasses (or their validation) reject, or options that a library
    function cannot honour (e.g. QLoRA without a GPU)."""


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


# ------------------------------------------------------------------------------------- telling user errors apart


# What torch's zip writer (`torch.save`, also inside DeepSpeed's and the Trainer's checkpoint saves) raises when a
# write fails, e.g. on a full disk: a RuntimeError that names neither the file nor the cause.
_TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "unexpected pos", "PytorchStreamWriter failed")


def _frames(err: BaseException):
    """The frames of `err`'s traceback, innermost first."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _written_path(err: BaseException) -> str | None:
    """The file a failed write was writing, read from the traceback: the target of `torch.save` (its `f`), or an
    open file object in the innermost frame that has one."""
    for frame in _frames(err):
        if frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py")) and "f" in frame.f_locals:
            target = frame.f_locals["f"]
            name = target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)
            if isinstance(name, (str, os.PathLike)):
                return os.fspath(name)
    for frame in _frames(err):
        for value in frame.f_locals.values():
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
        for name in ("filename", "path", "file", "f", "self"):  # save_file(..., filename), Path.write_text ...
            value = frame.f_locals.get(name)
            if isinstance(value, (str, PurePath)) and (name != "self" or isinstance(value, PurePath)):
                return os.fspath(value)
    return None


def _is_safetensors_disk_full(err: BaseException) -> bool:
    """safetensors' own error for a full disk (`I/O error: No space left on device (os error 28)`)."""
    return type(err).__name__ == "SafetensorError" and f"os error {errno.ENOSPC}" in str(err)


def _is_torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _TORCH_WRITE_FAILURES) and any(
        frame.f_code.co_filename.endswith(os.path.join("torch", "serialization.py")) for frame in _frames(err))


def _deepspeed_world_size_change(err: BaseException) -> bool:
    """DeepSpeed's refusal to load ZeRO optimizer states saved with another number of ranks."""
    return type(err).__name__ == "ZeRORuntimeException" and "world size" in str(err).lower()


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is one of the known user errors that programs report in one line: a `UserError` (which the
    library's own error types are, e.g. an unreadable image, too many bad samples, a visual tokenizer other than
    the model's), a JSON or YAML syntax error, a missing or unwritable file, a full disk."""
    import yaml

    if isinstance(err, (UserError, json.JSONDecodeError, yaml.YAMLError)):
        return True
    if isinstance(err, _USER_OS_ERRORS):
        return True
    if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
        return True
    return _is_torch_write_failure(err) or _is_safetensors_disk_full(err) or _deepspeed_world_size_change(err)


def _no_space(path: str | None, detail: str) -> str:
    where = path or "a file"
    return f"no space left on device while writing {where} ({detail}); free some space or choose another directory"


def describe_user_error(err: BaseException) -> str:
    """One line for a user error: what and where (file, line, column when the error knows them)."""
    import yaml

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        message = _no_space(err.filename or _written_path(err), err.strerror or str(err))
    elif _is_safetensors_disk_full(err):
        message = _no_space(_written_path(err), "safetensors: " + " ".join(str(err).split()))
    elif _is_torch_write_failure(err):
        path = _written_path(err)
        message = _no_space(path, "torch.save: " + str(err).splitlines()[0][:120])
        try:
            import shutil

            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) if path else ".").free
        except OSError:
            free = 0
        if free > 64 * 2**20:  # not a full disk after all: say what failed, without guessing
            message = f"writing {path or 'a checkpoint file'} failed (torch.save: {str(err).splitlines()[0][:120]})"
    elif _deepspeed_world_size_change(err):
        folder = next((frame.f_locals["load_dir"] for frame in _frames(err) if "load_dir" in frame.f_locals), None)
        message = (f"resume{f' from {folder}' if folder else ''}: {err} (resume with the number of processes that "
                   "saved the checkpoint, or convert it with DeepSpeed's universal checkpoint)")
    elif isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        problem = " ".join(part for part in (err.context, err.problem) if part)
        message = f"{mark.name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    elif isinstance(err, json.JSONDecodeError):
        message = f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
        message = f"{err.strerror}: {target}"
        if isinstance(err, PermissionError):
            message += " (check that this user may write/read there, or choose another directory)"
    else:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split()) or type(err).__name__
