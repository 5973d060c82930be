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
import errno
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

from unimm.utils.errors import UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "UNIMM_DEBUG"
EXIT_USER_ERROR = 2

# OSErrors that describe the user's files or machine, not a bug: reported in one line.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENOENT, errno.ENAMETOOLONG}


class ConfigError(UserError, ValueError):
    """A config key or value that a program's dataclasses (or their validation) reject."""


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
    """Whether `err` is one of the known user errors that programs report in one line."""
    import yaml

    if isinstance(err, (UserError, json.JSONDecodeError, yaml.YAMLError)):
        return True
    if isinstance(err, _USER_OS_ERRORS):
        return True
    if isinstance(err, OSError) and err.errno in _USER_ERRNOS:
        return True
    if _is_torch_write_failure(err) or _is_safetensors_disk_full(err) or _deepspeed_world_size_change(err):
        return True
    from unimm.data.bad_samples import TooManyBadSamplesError
    from unimm.data.images import ImageLoadError
    from unimm.llm.identity import VisualTokenizerMismatchError

    # An image a program was pointed at that cannot be read (training skips and counts bad images instead); a visual
    # tokenizer other than the model's (the message names both and the override).
    return isinstance(err, (TooManyBadSamplesError, ImageLoadError, VisualTokenizerMismatchError))


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
