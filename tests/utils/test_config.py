"""`unimm.utils.config`: YAML + CLI parsing, the alias mechanism, the field helper and the one resolved-config
writer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import yaml

from unimm.utils.config import Alias, config_field, make_config_parser, parse_config, save_resolved_config


def _precision(value):
    return {"bf16": str(value) == "bf16"}


@dataclass
class Options:
    config_aliases = (Alias("batch_size", "per_device_batch_size"), Alias("precision", "bf16", convert=_precision),
                      Alias("quiet_mode", "quiet"))

    per_device_batch_size: int = config_field(8, "Rows per device.")
    bf16: bool = config_field(False, "bfloat16 mixed precision.")
    quiet: bool = config_field(False, "Log less.")
    names: list[str] = config_field(["a"], "Some names.")


def test_yaml_and_command_line_aliases_set_the_new_fields(tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("batch_size: 4\nprecision: bf16\n")
    with caplog.at_level(logging.WARNING):
        (from_yaml,) = parse_config((Options,), [str(recipe)])
        (from_cli,) = parse_config((Options,), ["--batch_size=4", "--precision", "bf16", "--quiet_mode"])
        parse_config((Options,), ["--batch_size", "2"])
    assert (from_yaml.per_device_batch_size, from_yaml.bf16) == (4, True)
    assert (from_cli.per_device_batch_size, from_cli.bf16, from_cli.quiet) == (4, True, True)
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert sum("'batch_size'" in message for message in warned) <= 1  # once per process
    (new,) = parse_config((Options,), ["--per_device_batch_size", "4", "--bf16", "true", "--quiet", "true"])
    assert new == from_cli


def test_a_converting_alias_needs_its_value():
    with pytest.raises(ValueError, match="--precision needs a value"):
        parse_config((Options,), ["--precision"])


def test_help_lists_the_aliases():
    text = make_config_parser((Options,)).format_help()
    assert "--batch_size -> --per_device_batch_size" in text and "--precision -> --bf16" in text


def test_list_defaults_are_not_shared_between_instances():
    first, second = Options(), Options()
    first.names.append("b")
    assert second.names == ["a"]


def test_resolved_config_merges_configs_and_uses_to_dict(tmp_path):
    class WithToDict:
        def to_dict(self):
            return {"learning_rate": 0.1, "per_device_batch_size": 99}

    path = save_resolved_config(tmp_path / "run", Options(), None, WithToDict())
    written = yaml.safe_load(path.read_text())
    assert written == {"per_device_batch_size": 99, "bf16": False, "quiet": False, "names": ["a"],
                       "learning_rate": 0.1}
