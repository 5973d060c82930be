"""Typed dataclass configs read from YAML plus command-line overrides (via `transformers.HfArgumentParser`).

Programs call `parse_config((ModelArgs, DataArgs, ...), argv)`. `argv` may hold any number of YAML files
(positional, or after `--config`); their keys are merged in order and become the parser defaults, and the
remaining `--key value` flags override them. Unknown YAML keys fail loudly, naming the file and key.

- `config_field(default, help)`: a dataclass field with its one-line `--help` text (the one helper for it).
- `Alias(old, new, convert=None)`: a deprecated key still accepted in YAML and on the command line. A config class
  lists its aliases in a class attribute `config_aliases = (Alias(...), ...)`; `parse_config` maps the old key
  onto the new one(s) (`convert(value) -> {new_key: value}` when the meaning changes, not just the name), warns
  once per old key and process, and `--help` lists them.
- `renamed_arguments(old=new, ...)`: the same for a library function's keyword arguments (e.g. `tokenizer=` ->
  `text_tokenizer=`): the old keyword still works, with one warning per name and process.
- `save_resolved_config(run_dir, *configs)`: the one writer of `resolved_config.yaml`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from unimm.utils.logging import warn_once

logger = logging.getLogger(__name__)


def config_field(default: Any = None, help: str = "", **kwargs: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field with a one-line `--help` text; list/dict defaults become a `default_factory`."""
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True)
class Alias:
    """A deprecated config key: `old` is read as `new`, or as the keys `convert(value)` returns."""

    old: str
    new: str
    convert: Callable[[Any], dict[str, Any]] | None = None

    def resolve(self, value: Any) -> dict[str, Any]:
        return dict(self.convert(value)) if self.convert is not None else {self.new: value}

    def warn(self) -> None:
        warn_once(logger, f"config key {self.old!r} is deprecated; use {self.new!r} (still accepted for now)")


def renamed_arguments(**renames: str) -> Callable[[Callable], Callable]:
    """Decorate a function whose keyword arguments were renamed (`old="new"`): a call with the old keyword is
    passed on under the new one, with a warning once per old name and process; both at once is a TypeError."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__qualname__}() got {old}= (deprecated) and {new}=; pass {new}= only")
                    warn_once(logger, f"{func.__qualname__}({old}=...) is deprecated; use {new}= "
                                      "(still accepted for now)")
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call

    return decorate


def config_aliases(dataclass_types: Iterable[type]) -> dict[str, Alias]:
    """The aliases the config classes declare (`config_aliases` class attributes), by old key."""
    found: dict[str, Alias] = {}
    for dtype in dataclass_types:
        for alias in getattr(dtype, "config_aliases", ()):
            found[alias.old] = alias
    return found


def _argv_tokens(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *(str(v) for v in value)]
    return [f"--{key}", str(value)]


def _resolve_yaml_aliases(data: dict[str, Any], aliases: dict[str, Alias]) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        if key in aliases:
            aliases[key].warn()
            resolved.update(aliases[key].resolve(value))
        else:
            resolved[key] = value
    return resolved


def _resolve_argv_aliases(argv: list[str], aliases: dict[str, Alias]) -> list[str]:
    """`--old value` / `--old=value` -> the new flags. A plain rename keeps the values as they are (lists, a bare
    boolean flag); a converting alias takes exactly one value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, inline = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        alias = aliases.get(name.replace("-", "_")) if name else None
        if alias is None:
            out.append(arg)
            i += 1
            continue
        alias.warn()
        if alias.convert is None:
            out.append(f"--{alias.new}" + (f"={inline}" if has_value else ""))
            i += 1
            continue
        if has_value:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            raise ValueError(f"--{name} needs a value")
        for key, new_value in alias.resolve(value).items():
            out.extend(_argv_tokens(key, new_value))
    return out


def _alias_epilog(aliases: dict[str, Alias]) -> str | None:
    if not aliases:
        return None
    return "deprecated aliases (warn once): " + ", ".join(f"--{a.old} -> --{a.new}" for a in aliases.values())


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate YAML files (`--config F` or a bare `*.yaml` not serving as an option's value) from overrides."""
    yaml_files: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            yaml_files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            yaml_files.append(arg.split("=", 1)[1])
        else:
            previous_is_option = bool(rest) and rest[-1].startswith("--") and "=" not in rest[-1]
            if arg.endswith((".yaml", ".yml")) and not arg.startswith("-") and not previous_is_option:
                yaml_files.append(arg)
            else:
                rest.append(arg)
        i += 1
    return yaml_files, rest


def config_origins(argv: Sequence[str]) -> dict[str, str]:
    """Which YAML file of `argv` set each key (the last one, as in `parse_config`); for error messages."""
    yaml_files, _ = _split_argv(list(argv))
    return {key: str(path) for path in yaml_files if Path(path).is_file() for key in load_yaml(path)}


def make_config_parser(dataclass_types: Sequence[type], prog: str | None = None,
                       epilog: str | None = None) -> HfArgumentParser:
    """The command-line parser of a program's configs: one option per field, with its help; `--help` also lists
    the deprecated aliases, then `epilog`. `parse_config` adds the YAML files' values as defaults."""
    parts = [text for text in (_alias_epilog(config_aliases(dataclass_types)), epilog) if text]
    return HfArgumentParser(list(dataclass_types), prog=prog, epilog="\n\n".join(parts) or None)


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
                 epilog: str | None = None) -> tuple[Any, ...]:
    """Parse YAML files + CLI overrides into instances of `dataclass_types` (in the same order)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_files, rest = _split_argv(argv)
    aliases = config_aliases(dataclass_types)
    rest = _resolve_argv_aliases(rest, aliases)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}
    defaults: dict[str, Any] = {}
    for path in yaml_files:
        data = _resolve_yaml_aliases(load_yaml(path), aliases)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        defaults.update(data)
    # HfArgumentParser makes a field without a default a required flag, which a YAML value could not satisfy:
    # every config field has a default, and required values are checked in the dataclass's __post_init__.
    required = [f"{t.__name__}.{f.name}" for t in dataclass_types for f in dataclasses.fields(t)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise TypeError(f"config fields without a default cannot be set from YAML: {required}; give them a default "
                        "and check them in __post_init__")
    parser = make_config_parser(dataclass_types, epilog=epilog)
    parser.set_defaults(**defaults)
    outputs = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
    return tuple(outputs)


def _plain(value: Any) -> Any:
    """A YAML-safe copy of `value`: enums become their values, unknown objects their string form."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value


def config_to_dict(*configs: Any) -> dict[str, Any]:
    """Every field of every config, merged in order (None entries skipped). A config with its own `to_dict`
    (`transformers.TrainingArguments`, which hides tokens and turns enums into values) is written through it."""
    merged: dict[str, Any] = {}
    for cfg in configs:
        if cfg is None:
            continue
        if callable(getattr(cfg, "to_dict", None)):
            merged.update(_plain(cfg.to_dict()))
            continue
        for f in dataclasses.fields(cfg):
            merged[f.name] = _plain(getattr(cfg, f.name))
    return merged


def save_resolved_config(out_dir: str | Path, *configs: Any, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config (all dataclasses merged, see `config_to_dict`) into the run directory; the
    one writer of `resolved_config.yaml` for every program."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("w") as f:
        yaml.safe_dump(config_to_dict(*configs), f, sort_keys=False)
    return path
