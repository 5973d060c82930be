"""Every shipped YAML recipe parses through the parser of the script that runs it."""

from __future__ import annotations

import json

import pytest

from tests.entry.conftest import REPO, load_script

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
FINETUNE = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
CPU = ["--bf16", "false", "--output_dir", "unused"]  # recipes target GPUs; bf16 needs one


def test_recipes_exist():
    assert PRETRAIN and FINETUNE


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.name)
def test_pretrain_recipe_parses(path):
    from unimm.utils.config import parse_config

    model_args, data_args, training_args = parse_config(load_script("pretrain").CONFIG_TYPES, [str(path), *CPU])
    assert model_args.model_path or (model_args.llm_path and model_args.tokenizer_path)
    assert data_args.code_cache and (data_args.caption_weight > 0 or data_args.t2i_weight > 0)
    assert training_args.remove_unused_columns is False
    model_args.config_overrides()


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_finetune_recipe_parses(path):
    from unimm.utils.config import parse_config

    model_args, data_args, lora_args, training_args = parse_config(load_script("finetune").CONFIG_TYPES,
                                                                   [str(path), *CPU])
    assert data_args.conversation_json and data_args.conversation_weight > 0
    if lora_args.use_lora:
        assert lora_args.target_modules()


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs(name):
    config = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2" else 3)
    # The Trainer fills batch sizes and precision from its own arguments.
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_unknown_yaml_key_is_named(tmp_path):
    from unimm.utils.config import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("llm_path: x\ntokenizer_path: y\nlearning_rte: 1.0\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_config(load_script("pretrain").CONFIG_TYPES, [str(bad), *CPU])
