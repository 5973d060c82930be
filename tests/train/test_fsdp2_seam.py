"""The parallelism seam (`unimm.utils.parallel`) in one process: the model and tokenizer layers never import an
engine, no gather helper lives outside the seam, engine detection, the FSDP2 plugin arguments, the state-dict
gather and the refusals. The multi-rank behaviour is tests/train/test_fsdp2.py."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unimm.utils import parallel

ROOT = Path(__file__).resolve().parents[2]
ENGINE_MODULES = ("deepspeed", "torch.distributed.fsdp", "torch.distributed._composable.fsdp")
# DeepSpeed's and FSDP's marks on a parameter or their gather API: only the seam may look at them
ENGINE_ATTRIBUTES = ("ds_id", "ds_shape", "ds_tensor", "GatheredParameters", "full_tensor", "fully_shard")


def _engine_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names
                  if any(name == m or name.startswith(m + ".") for m in ENGINE_MODULES)]
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_ATTRIBUTES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")
        if isinstance(node, ast.Constant) and node.value in ENGINE_ATTRIBUTES:  # hasattr(p, "ds_id")
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.value!r}")
    return found


@pytest.mark.parametrize("layer", ["tokenizer", "llm"])
def test_model_layers_never_import_deepspeed_or_fsdp(layer):
    uses = [use for path in sorted((ROOT / "unimm" / layer).rglob("*.py")) for use in _engine_uses(path)]
    assert not uses, "only unimm/utils/parallel.py may touch DeepSpeed / FSDP:\n" + "\n".join(uses)


def test_no_gather_helper_outside_the_seam():
    seam = ROOT / "unimm" / "utils" / "parallel.py"
    offenders = []
    for path in sorted((ROOT / "unimm").rglob("*.py")):
        if path == seam:
            continue
        tree = ast.parse(path.read_text(), str(path))
        offenders += [f"{path.relative_to(ROOT)}:{node.lineno} defines {node.name}" for node in ast.walk(tree)
                      if isinstance(node, ast.FunctionDef) and "gathered" in node.name]
        offenders += [use for use in _engine_uses(path) if "GatheredParameters" in use or "ds_id" in use]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(("args", "expected"), [
    (SimpleNamespace(deepspeed="configs/deepspeed/zero2.json", fsdp=None), "deepspeed-zero2"),
    (SimpleNamespace(deepspeed=str(ROOT / "configs/deepspeed/zero3.json"), fsdp=None), "deepspeed-zero3"),
    (SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}}, fsdp=None), "deepspeed-zero3"),
    (SimpleNamespace(deepspeed=None, fsdp=True, fsdp_config={"version": 2}), "fsdp2"),
    (SimpleNamespace(deepspeed=None, fsdp=None), "none"),
])
def test_engine_from_training_arguments(args, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert parallel.engine(args) == expected


def test_engine_of_the_live_state():
    """Without arguments: a live ZeRO-3 config (what `--deepspeed zero3.json` installs) names ZeRO-3; one plain
    process is `none`."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    assert parallel.engine() == "none"
    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert parallel.engine() == "deepspeed-zero3" and parallel.zero3_enabled()
        with parallel.zero3_init_disabled():
            assert parallel.engine() == "none"
    finally:
        unset_hf_deepspeed_config()
        del config
    assert parallel.engine() == "none"


def test_engine_refuses_fsdp1():
    with pytest.raises(ValueError, match="FSDP version 1; UniMM trains with FSDP2"):
        parallel.engine(SimpleNamespace(deepspeed=None, fsdp=True, fsdp_config={"version": 1}))


def test_engine_of_real_training_arguments(tmp_path):
    from unimm.train.args import UniMMTrainingArguments

    args = UniMMTrainingArguments(output_dir=str(tmp_path), fsdp=True,
                                  fsdp_config=str(ROOT / "configs/fsdp/fsdp2.json"), use_cpu=True).finalize()
    assert parallel.engine(args) == "fsdp2"
    assert args.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"


def _tiny_unimm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unimm.llm import UniMMForCausalLM

    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    return UniMMForCausalLM.from_llm(llm, {"pixel": (16, 2)}, depth_head_layers=1)


def test_fsdp_arguments_wrap_the_model_layers_and_reduce_in_float32():
    model = _tiny_unimm()
    args = SimpleNamespace(fsdp_plugin_args={"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}, fsdp_config={},
                           bf16=True, fp16=False)
    parallel.prepare_fsdp_arguments(args, model)
    # UniMM's depth-head blocks and the wrapped LLM's decoder layers, found in the model
    assert set(args.fsdp_plugin_args["transformer_cls_names_to_wrap"].split(",")) == {"DepthBlock", "Qwen2DecoderLayer"}
    assert args.fsdp_plugin_args["mixed_precision_policy"] == {"param_dtype": torch.bfloat16,
                                                               "reduce_dtype": torch.float32}
    # what the config names wins
    args = SimpleNamespace(fsdp_plugin_args={"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}, bf16=False, fp16=False,
                           fsdp_config={"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
                                        "mixed_precision_policy": {"param_dtype": "float16", "reduce_dtype": "fp32"}})
    parallel.prepare_fsdp_arguments(args, model)
    assert "transformer_cls_names_to_wrap" not in args.fsdp_plugin_args
    assert args.fsdp_plugin_args["mixed_precision_policy"]["param_dtype"] == torch.float16
    args.fsdp_config["mixed_precision_policy"] = {"param_dtype": "int8", "reduce_dtype": "fp32"}
    with pytest.raises(ValueError, match=r"mixed_precision_policy: unknown dtype\(s\) \['int8'\]"):
        parallel.prepare_fsdp_arguments(args, model)


def test_full_state_dict_of_a_plain_model_keeps_ties():
    model = _tiny_unimm()
    state = parallel.full_state_dict(model)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].device.type == "cpu" and torch.equal(state[k], reference[k]) for k in state)
    embed = "language_model.model.embed_tokens.weight"
    assert state["language_model.lm_head.weight"] is state[embed]  # tied: one tensor
    assert state[embed].data_ptr() != reference[embed].data_ptr()  # a copy


FULLY_SHARDED = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from unimm.utils import parallel

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
before = {k: v.clone() for k, v in model.state_dict().items()}
fully_shard(model[0]); fully_shard(model)
weight = model[0].weight
assert parallel.is_partitioned(weight) and parallel.full_shape(weight) == (3, 4), type(weight)
state = parallel.full_state_dict(model)
assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
assert not any(parallel.is_partitioned(v) for v in state.values())
try:
    parallel.gathered([weight])
except ValueError as err:
    assert "cannot be gathered in place" in str(err)
else:
    raise AssertionError("gathered accepted a DTensor")
dist.destroy_process_group()
print("ok")
"""


def test_full_state_dict_gathers_fsdp2_dtensors(tmp_path):
    """A model under `fully_shard` (one gloo rank, in a fresh process): its parameters are DTensors the seam calls
    partitioned; `full_state_dict` returns the plain tensors; `gathered` refuses them."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FULLY_SHARDED, str(tmp_path / "store")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_gathered_is_a_no_op_on_plain_parameters():
    plain = nn.Parameter(torch.ones(2))
    with parallel.gathered([plain], modifier_rank=0):
        plain.data.mul_(2)
    assert plain.tolist() == [2.0, 2.0] and not parallel.is_partitioned(plain)


def test_fsdp2_refuses_training_only_the_new_rows():
    from unimm.train.args import LoraArguments, ModelArguments
    from unimm.train.llm.trainer import check_engine_supports
    from unimm.utils.errors import UserError

    rows_only = ModelArguments(model_path="m", train_llm=False, train_new_embeddings=True)
    with pytest.raises(UserError, match="not supported under FSDP2"):
        check_engine_supports("fsdp2", rows_only, None)
    check_engine_supports("ddp", rows_only, None)
    check_engine_supports("fsdp2", rows_only, LoraArguments(use_lora=True))
    check_engine_supports("fsdp2", ModelArguments(model_path="m"), None)
