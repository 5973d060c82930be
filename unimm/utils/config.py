"""Typed dataclass configs read from YAML plus command-line overrides (via `transformers.HfArgumentParser`).

Programs call `parse_config((ModelArgs, DataArgs, ...), argv)`. `argv` may hold any number of YAML files
(positional, or after `--config`); their keys are merged in order and become the parser defaults, and the
remaining `--key value` flags override them. Unknown YAML keys fail loudly, naming the file and key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


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


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse YAML files + CLI overrides into instances of `dataclass_types` (in the same order)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_files, rest = _split_argv(argv)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    defaults: dict[str, Any] = {}
    for path in yaml_files:
        data = load_yaml(path)
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
    parser = HfArgumentParser(list(dataclass_types))
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
    merged: dict[str, Any] = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            merged[f.name] = _plain(getattr(cfg, f.name))
    return merged


def save_resolved_config(out_dir: str | Path, *configs: Any, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config (all dataclasses merged) into the run directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("w") as f:
        yaml.safe_dump(config_to_dict(*configs), f, sort_keys=False)
    return path
