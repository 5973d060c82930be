"""Every YAML recipe in configs/ parses through the parser of the program that runs it, old key names through
their aliases (with one warning each) to the same configs as the new names."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from unimm.cli import finetune, pretrain
from unimm.cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CPU = ["--bf16", "false", "--output_dir", "unused"]  # recipes target GPUs; bf16 needs one
ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))


def _program_of(path: Path):
    """The program that runs a recipe, by where it lives."""
    relative = path.relative_to(REPO / "configs")
    if relative.parts[0] == "tokenizer" or relative.name.startswith("tokenizer_"):
        from unimm.cli import train_tokenizer

        return train_tokenizer, ["--output_dir", "unused"]
    # The quickstart recipes get their paths from scripts/quickstart.sh, with the flags it passes.
    if relative.parts[0] == "pretrain":
        return pretrain, CPU
    if relative.name == "pretrain.yaml":
        return pretrain, ["--llm_path", "llm", "--tokenizer_path", "tok", "--code_cache", "cache", *CPU]
    if relative.name == "pretrain_vqrae.yaml":
        return pretrain, ["--llm_path", "llm", "--tokenizer_path", "tok", "--code_cache", "cache",
                          "--conversation_json", "captions_llava.json", *CPU]
    if relative.parts[0] == "finetune":
        return finetune, CPU
    if relative.name in ("finetune.yaml", "finetune_vqrae.yaml"):
        return finetune, ["--model_path", "pretrain", "--tokenizer_path", "tok", *CPU]
    raise AssertionError(f"{relative}: no program is known to run this recipe; add it to _program_of")


def test_every_recipe_has_a_program():
    assert len(ALL_YAML) >= 10
    for path in ALL_YAML:
        _program_of(path)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_recipe_parses(path):
    program, extra = _program_of(path)
    configs = program.parse_args([str(path), *extra])
    if program.__name__ == "unimm.cli.train_tokenizer":
        return  # the tokenizer recipes' own checks are in tests/tokenizer
    model_args, modules, data_args, *_, training_args = configs
    assert model_args.model_path or (model_args.llm_path and model_args.visual_tokenizer_path)
    assert training_args.remove_unused_columns is False
    modules.overrides()
    if program is pretrain:
        assert data_args.code_cache and (data_args.caption_weight > 0 or data_args.t2i_weight > 0)
    else:
        assert data_args.conversation_weight > 0


def test_old_key_names_parse_to_the_new_fields_and_warn_once(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text('tokenizer_path: tok\nllm_path: llm\nmodel_config_overrides: \'{"depth_head_layers": 1, '
                   '"image_position_embedding": true}\'\n')
    new = tmp_path / "new.yaml"
    new.write_text("visual_tokenizer_path: tok\nllm_path: llm\ndepth_head_layers: 1\nimage_position_embedding: true\n")
    with caplog.at_level(logging.WARNING):
        from_old = pretrain.parse_args([str(old), *CPU])
        pretrain.parse_args([str(old), "--tokenizer_path", "tok", *CPU])
    from_new = pretrain.parse_args([str(new), *CPU])
    assert from_old[:3] == from_new[:3]
    assert from_old[0].visual_tokenizer_path == "tok" and from_old[1].overrides()["depth_head_layers"] == 1
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert sum("'tokenizer_path'" in w for w in warnings) <= 1  # once per process, however often it is used
    assert sum("'model_config_overrides'" in w for w in warnings) <= 1


def test_command_line_aliases_match_the_new_flags():
    old = pretrain.parse_args(["--llm_path", "l", "--tokenizer_path=t", "--model_config_overrides",
                               json.dumps({"depth_head_hidden_size": 128}), *CPU])
    new = pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t", "--depth_head_hidden_size", "128",
                               *CPU])
    assert old[:3] == new[:3]


def test_presets_and_fields_resolve_in_order():
    (_, modules, *_) = pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t", "--model_preset",
                                            "tiny", "--depth_head_layers", "2", *CPU])
    assert modules.overrides() == {"depth_head_layers": 2, "depth_head_hidden_size": 128,
                                   "depth_head_intermediate_size": 512, "image_position_embedding": True}
    with pytest.raises(ConfigError, match="model_preset"):
        pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t", "--model_preset", "huge", *CPU])
    with pytest.raises(ConfigError, match="feature_dim"):
        pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t", "--model_config_overrides",
                             '{"feature_dim": 3}', *CPU])


def test_preset_fields_are_unimm_config_fields():
    from dataclasses import fields

    from unimm.llm import UniMMConfig
    from unimm.llm.presets import MODEL_PRESETS, VisualModulesConfig

    config_fields = set(UniMMConfig.__dataclass_fields__) if hasattr(UniMMConfig, "__dataclass_fields__") else set(
        vars(UniMMConfig()))
    for name in {f.name for f in fields(VisualModulesConfig)} - {"model_preset"}:
        assert name in config_fields, name
    for preset in MODEL_PRESETS.values():
        assert set(preset) <= config_fields


def test_data_arguments_are_the_data_layers_configs():
    from unimm.data.mixture import MixtureConfig
    from unimm.data.tasks import SampleConfig

    (_, _, data_args, training_args) = pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t",
                                                             "--uncond_prob", "0.3", "--caption_weight", "2",
                                                             "--data_seed_offset", "5", "--seed", "7", *CPU])
    assert isinstance(data_args, SampleConfig) and isinstance(data_args, MixtureConfig)
    sample, mixture = data_args.sample_config(training_args.seed), data_args.mixture_config(training_args.seed)
    assert (sample.uncond_prob, sample.seed) == (0.3, 7) and (mixture.caption_weight, mixture.seed) == (2.0, 12)
    with pytest.raises(ConfigError, match="uncond_prob"):
        pretrain.parse_args(["--llm_path", "l", "--visual_tokenizer_path", "t", "--uncond_prob", "2", *CPU])


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
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm_path: x\nvisual_tokenizer_path: y\nlearning_rte: 1.0\n")
    with pytest.raises(ConfigError, match="learning_rte"):
        pretrain.parse_args([str(bad), *CPU])


def test_quickstart_recipes_build_the_visual_modules_they_name():
    """The quickstart recipes name `model_preset: tiny`, which is exactly the JSON overrides they held before; the
    DualToken recipe then swaps the learned image-position table for the 2D sin-cos one (the VQRAE recipe keeps
    the preset's)."""
    from unimm.llm.presets import MODEL_PRESETS

    before = {"depth_head_layers": 1, "depth_head_hidden_size": 128, "depth_head_intermediate_size": 512,
              "image_position_embedding": True}
    assert MODEL_PRESETS["tiny"] == before
    overrides = {}
    for name in ("pretrain.yaml", "pretrain_vqrae.yaml"):
        program, extra = _program_of(REPO / "configs" / "quickstart" / name)
        (_, modules, *_) = program.parse_args([str(REPO / "configs" / "quickstart" / name), *extra])
        overrides[name] = modules.overrides()
    assert overrides["pretrain.yaml"] == {
        **before,
        "image_position_embedding_type": "sincos_2d",
        "image_position_sincos_temperature": 16,
    }
    assert overrides["pretrain_vqrae.yaml"] == before


def test_pretokenize_refuses_an_unknown_dtype():
    from unimm.cli import pretokenize

    with pytest.raises(ConfigError, match="float64"):
        pretokenize.parse_args(["--data", "d", "--tokenizer_path", "t", "--output_dir", "o", "--dtype", "float64"])
    (config,) = pretokenize.parse_args(["--data", "d", "--tokenizer_path", "t", "--output_dir", "o"])
    assert config.dtype == "float32"


def test_dtype_is_the_one_name_and_torch_dtype_an_alias_that_warns_once(tmp_path, caplog):
    """Every program names a weight dtype `dtype`; the LLM programs' old `torch_dtype` (YAML or flag) still parses,
    to the same configs, with one warning."""
    old = tmp_path / "old.yaml"
    old.write_text("visual_tokenizer_path: tok\nllm_path: llm\ntorch_dtype: bfloat16\n")
    with caplog.at_level(logging.WARNING):
        from_yaml = pretrain.parse_args([str(old), *CPU])
        from_flag = pretrain.parse_args(["--llm_path", "llm", "--visual_tokenizer_path", "tok", "--torch_dtype",
                                         "bfloat16", *CPU])
    new = pretrain.parse_args(["--llm_path", "llm", "--visual_tokenizer_path", "tok", "--dtype", "bfloat16", *CPU])
    assert from_yaml[0] == from_flag[0] == new[0] and new[0].dtype == "bfloat16"
    assert new[0].torch_dtype == "bfloat16"  # read by code written before the rename
    assert "torch_dtype" not in {f.name for f in dataclasses.fields(new[0])}
    warnings = [r.getMessage() for r in caplog.records if "'torch_dtype' is deprecated; use 'dtype'" in r.getMessage()]
    assert len(warnings) <= 1  # once per process (another test may have warned first)
    from unimm.cli import chat, generate_t2i, pretokenize

    for program in (chat, generate_t2i, pretokenize):  # the inference programs and pretokenize: the same name
        assert any(a.dest == "dtype" for a in program.make_parser()._actions), program.__name__


def test_a_checkpoint_fingerprinted_with_torch_dtype_resumes_under_dtype(tmp_path):
    from unimm.train.guards import check_resume_fingerprint, run_fingerprint, write_fingerprint
    from unimm.utils.errors import UserError

    write_fingerprint(tmp_path, run_fingerprint({"torch_dtype": "auto", "learning_rate": 1e-3}, 1, None))
    check_resume_fingerprint(tmp_path, run_fingerprint({"dtype": "auto", "learning_rate": 1e-3}, 1, None), False)
    with pytest.raises(UserError, match='dtype: "auto" -> "bfloat16"'):
        check_resume_fingerprint(tmp_path, run_fingerprint({"dtype": "bfloat16", "learning_rate": 1e-3}, 1, None),
                                 allow_change=False)


def test_tokenizer_training_arguments_take_the_trainer_fields_from_transformers():
    """The fields the tokenizer trainer shares with `transformers.TrainingArguments` are built from transformers'
    own definitions (same name; transformers' type unless narrowed to whole steps; its help unless replaced), not
    copied: each is inherited from `SharedTrainingArguments`, and the defaults the tokenizer trainer had stay."""
    from transformers import TrainingArguments

    from unimm.train.tokenizer.args import SharedTrainingArguments, TokenizerTrainingArguments

    theirs = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    shared = {f.name for f in dataclasses.fields(SharedTrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(TokenizerTrainingArguments)}
    assert set(ours) & set(theirs) == shared and len(shared) == 18
    assert issubclass(TokenizerTrainingArguments, SharedTrainingArguments)
    for name in ("per_device_train_batch_size", "adam_beta1", "adam_beta2", "max_grad_norm", "fp16"):
        assert ours[name].metadata["help"] == theirs[name].metadata["help"] and ours[name].type == theirs[name].type
    for name in ("warmup_steps", "logging_steps", "eval_steps", "save_steps"):  # whole steps here, no ratios
        assert ours[name].type is int and theirs[name].type is not int
    defaults = {name: ours[name].default for name in shared}
    assert defaults == {"output_dir": None, "seed": 0, "max_steps": 1000, "per_device_train_batch_size": 8,
                        "learning_rate": 1e-4, "weight_decay": 0.05, "adam_beta1": 0.9, "adam_beta2": 0.95,
                        "warmup_steps": 0, "max_grad_norm": 1.0, "bf16": None, "fp16": False,
                        "gradient_checkpointing": False, "logging_steps": 10, "eval_steps": 0, "save_steps": 1000,
                        "save_total_limit": 2, "resume_from_checkpoint": None}
    from unimm.cli import train_tokenizer

    *_, args = train_tokenizer.parse_args(["--preset", "vqrae-tiny", "--output_dir", "o", "--save_steps", "7",
                                           "--warmup_steps", "3", "--bf16", "false"])
    assert (args.save_steps, args.warmup_steps, args.bf16) == (7, 3, False) and isinstance(args.save_steps, int)


def test_tokenizer_evaluation_embeds_the_image_source_of_the_training_data():
    """The evaluation's image options are the trainer's (one definition, `ImageSourceArguments`), and its arguments
    are what the record loader reads: no second copy of the fields, no rebuilt data arguments."""
    from unimm.cli import eval_tokenizer, train_tokenizer
    from unimm.inference.tokenizer_eval import TokenizerEvalArguments
    from unimm.train.tokenizer.args import ImageSourceArguments, TokenizerDataArguments

    source = {f.name for f in dataclasses.fields(ImageSourceArguments)}
    assert source == {"dataset", "image_key", "split", "image_size", "num_samples", "allow_outside_image_folder",
                      "max_bad_fraction"}
    assert issubclass(TokenizerEvalArguments, ImageSourceArguments)
    assert issubclass(TokenizerDataArguments, ImageSourceArguments)
    (args,) = eval_tokenizer.parse_args(["--model_path", "m", "--dataset", "shapes", "--output_json", "o.json",
                                         "--allow_outside_image_folder", "true"])
    assert args.num_samples == 64 and args.allow_outside_image_folder is True  # the evaluation's smaller default
    configs = train_tokenizer.parse_args(["--preset", "vqrae-tiny", "--output_dir", "o", "--dataset", "shapes"])
    (train_data,) = [c for c in configs if isinstance(c, TokenizerDataArguments)]
    assert train_data.num_samples == 256
