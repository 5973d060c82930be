"""The feature projector is LLaVA's (`mlp2x_gelu`, `linear`) and travels in LLaVA's `mm_projector.bin` key layout
and in UniMM's: round trips give the same model outputs, LLaVA's own module computes the same function from the
file, existing checkpoints keep loading, and bad files are refused naming the file, the key and the shapes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.llm.projector import ProjectorFileError, load_mm_projector, save_mm_projector
from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group
from unimm.utils.imports import is_deepspeed_available

FEATURE_DIM = 24
NUM_POSITIONS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(llm_path, seed, projector_type="mlp2x_gelu", feature_dim=FEATURE_DIM):
    """The same LLM weights (and new vocabulary rows) every time; the projector drawn from `seed`."""
    torch.manual_seed(0)
    model = UniMMForCausalLM.from_llm(llm_path, None, feature_dim=feature_dim, feature_projector_type=projector_type,
                                      attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    layout = extend_tokenizer_and_model(tokenizer, model, {})
    torch.manual_seed(seed)
    for module in model.feature_projector.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.5)
            nn.init.normal_(module.bias, std=0.5)
    return model.eval(), layout


def _inputs(layout, feature_dim=FEATURE_DIM):
    ids = [5, 6, layout.boi_token_id] + [layout.image_token_id] * NUM_POSITIONS + [layout.eoi_token_id, 7, 8]
    features = torch.randn(1, NUM_POSITIONS, feature_dim, generator=torch.Generator().manual_seed(3))
    return {"input_ids": torch.tensor([ids]), "image_features": features}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
@pytest.mark.parametrize("layout_name", ["llava", "unimm"])
def test_round_trip_gives_equal_outputs(tiny_llama_path, tmp_path, projector_type, layout_name):
    source, layout = _model(tiny_llama_path, seed=0, projector_type=projector_type)
    target, _ = _model(tiny_llama_path, seed=1, projector_type=projector_type)
    inputs = _inputs(layout)
    assert not torch.allclose(_logits(source, inputs), _logits(target, inputs), atol=1e-3)
    path = save_mm_projector(source, tmp_path / "mm_projector.bin", layout=layout_name)
    assert load_mm_projector(target, path) == []
    assert torch.equal(_logits(source, inputs), _logits(target, inputs))


@pytest.mark.parametrize("projector_type, keys", [
    ("mlp2x_gelu", ["model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                    "model.mm_projector.2.weight"]),
    ("linear", ["model.mm_projector.bias", "model.mm_projector.weight"]),
])
def test_llava_file_has_llavas_keys_and_llavas_module_computes_the_same(tiny_llama_path, tmp_path, projector_type,
                                                                        keys):
    """LLaVA builds `mlp2x_gelu` as nn.Sequential(Linear, GELU, Linear) and `linear` as nn.Linear, and loads
    `mm_projector.bin` by stripping everything up to `mm_projector.`."""
    model, _ = _model(tiny_llama_path, seed=0, projector_type=projector_type)
    path = save_mm_projector(model, tmp_path / "mm_projector.bin")
    state = torch.load(path, weights_only=True)
    assert sorted(state) == keys
    hidden = model.config.hidden_size
    llava = (nn.Sequential(nn.Linear(FEATURE_DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden))
             if projector_type == "mlp2x_gelu" else nn.Linear(FEATURE_DIM, hidden))
    llava.load_state_dict({k.split("mm_projector.")[1]: v for k, v in state.items()})
    features = torch.randn(3, 5, FEATURE_DIM)
    with torch.no_grad():
        assert torch.equal(llava(features), model.feature_projector(features))


def test_llava_stage1_file_in_bf16_with_other_keys_loads(tiny_llama_path, tmp_path):
    """LLaVA's stage 1 saves bf16 tensors and, with --mm_use_im_start_end, embed_tokens rows beside the projector."""
    source, _ = _model(tiny_llama_path, seed=0)
    path = save_mm_projector(source, tmp_path / "mm_projector.bin")
    state = {k: v.to(torch.bfloat16) for k, v in torch.load(path, weights_only=True).items()}
    state["model.embed_tokens.weight"] = torch.zeros(3, 4)
    torch.save(state, path)
    target, _ = _model(tiny_llama_path, seed=1)
    assert load_mm_projector(target, path) == ["model.embed_tokens.weight"]
    assert target.feature_projector.linear_2.weight.dtype == torch.float32
    assert torch.equal(target.feature_projector.linear_2.weight, state["model.mm_projector.2.weight"].float())


def test_projector_loads_from_a_whole_unimm_model_file(tiny_llama_path, tmp_path):
    source, layout = _model(tiny_llama_path, seed=0)
    source.save_pretrained(tmp_path / "model")
    target, _ = _model(tiny_llama_path, seed=1)
    ignored = load_mm_projector(target, tmp_path / "model" / "model.safetensors")
    assert ignored and all("feature_projector" not in key for key in ignored)
    assert torch.equal(_logits(source, _inputs(layout)), _logits(target, _inputs(layout)))


def test_checkpoints_without_the_projector_type_load_as_before(tiny_llama_path, tmp_path):
    """Models saved before `feature_projector_type` existed have no such key: they load as `mlp2x_gelu`, with the
    module names they were saved with."""
    source, layout = _model(tiny_llama_path, seed=0)
    assert sorted(k for k in source.state_dict() if k.startswith("feature_projector.")) == [
        "feature_projector.linear_1.bias", "feature_projector.linear_1.weight", "feature_projector.linear_2.bias",
        "feature_projector.linear_2.weight"]
    source.save_pretrained(tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("feature_projector_type") == "mlp2x_gelu"
    config.pop("vision_tower")
    config_file.write_text(json.dumps(config))
    loaded = UniMMForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.feature_projector_type == "mlp2x_gelu"
    assert torch.equal(_logits(source, _inputs(layout)), _logits(loaded, _inputs(layout)))


@pytest.mark.parametrize("layout_name, key", [("llava", "model.mm_projector.0.weight"), ("unimm", "linear_1.weight")])
def test_wrong_shape_is_refused_naming_file_key_and_shapes(tiny_llama_path, tmp_path, layout_name, key):
    source, _ = _model(tiny_llama_path, seed=0, feature_dim=32)
    path = save_mm_projector(source, tmp_path / "projector.file", layout=layout_name)
    target, _ = _model(tiny_llama_path, seed=1)
    before = target.feature_projector.linear_2.weight.clone()
    hidden = target.config.hidden_size
    with pytest.raises(ProjectorFileError, match=rf"{path}: {key} has shape \[{hidden}, 32\], but the model's "
                                                 rf"projector expects \[{hidden}, {FEATURE_DIM}\]"):
        load_mm_projector(target, path)
    assert torch.equal(target.feature_projector.linear_2.weight, before)  # nothing half-loaded


def test_other_projector_types_and_bad_files_are_refused(tiny_llama_path, tmp_path):
    linear, _ = _model(tiny_llama_path, seed=0, projector_type="linear")
    mlp, _ = _model(tiny_llama_path, seed=1)
    path = save_mm_projector(linear, tmp_path / "linear.bin")
    with pytest.raises(ProjectorFileError, match=r"lacks \['model.mm_projector.0.weight'.*the model's projector is "
                                                 r"'mlp2x_gelu', the file's looks like 'linear'"):
        load_mm_projector(mlp, path)
    path = save_mm_projector(mlp, tmp_path / "mlp.safetensors", layout="unimm")
    with pytest.raises(ProjectorFileError, match=r"has \['linear_2.bias', 'linear_2.weight'\], which the model's "
                                                 r"projector does not"):
        load_mm_projector(linear, path)
    partial = {k: v for k, v in torch.load(save_mm_projector(mlp, tmp_path / "full.bin"), weights_only=True).items()
               if not k.endswith("2.bias")}
    torch.save(partial, tmp_path / "partial.bin")
    with pytest.raises(ProjectorFileError, match=r"partial.bin: a LLaVA-layout projector file that lacks "
                                                 r"\['model.mm_projector.2.bias'\]"):
        load_mm_projector(mlp, tmp_path / "partial.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ProjectorFileError, match="junk.bin: not a readable projector file"):
        load_mm_projector(mlp, tmp_path / "junk.bin")
    with pytest.raises(ProjectorFileError, match="is a folder; pass the projector file itself"):
        load_mm_projector(mlp, tmp_path)
    with pytest.raises(FileNotFoundError, match="projector file not found"):
        load_mm_projector(mlp, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="feature_projector_type must be one of"):
        UniMMForCausalLM.from_llm(tiny_llama_path, None, feature_dim=8, feature_projector_type="mlp3x_gelu")


@pytest.mark.slow
@pytest.mark.skipif(not is_deepspeed_available(), reason="needs deepspeed")
def test_zero3_partitioned_projector_saves_gathered_and_loads(tmp_path):
    script = Path(__file__).with_name("zero3_projector.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    build_deepspeed_comm_op(env)
    proc = run_process_group([sys.executable, str(script), str(tmp_path), str(free_port())], timeout=600, env=env)
    assert proc.returncode == 0 and "ZERO3_PROJECTOR_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_text_only_training_batch_reaches_the_projector_with_zero_gradients(tiny_llama_path):
    """LLaVA mixes hold text-only samples; a rank whose batch has no image must still give every projector parameter
    a gradient (DDP), and the loss must be the plain text loss."""
    model, _ = _model(tiny_llama_path, seed=0)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[5, 6, 7, 8, 9]])}
    with torch.no_grad():
        reference = model(**batch).loss
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.equal(loss.detach(), reference)
    assert all(p.grad is not None and not p.grad.any() for p in model.feature_projector.parameters())
