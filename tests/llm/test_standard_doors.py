"""UniMM through transformers' Auto classes after `import unimm`, and the visual tokenizer identity a model records
(`unimm.llm.identity`): same spec but other weights (VQRAE stage 1 vs stage 2) is refused, naming both."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from tests.llm.conftest import HEAD_KWARGS, image_batch
from unimm.llm import UniMMConfig, UniMMForCausalLM, extend_tokenizer_and_model
from unimm.llm.identity import VisualTokenizerMismatchError, check_visual_tokenizer, visual_tokenizer_identity
from unimm.tokenizer import build_tokenizer, load_tokenizer


@pytest.fixture
def stages(tmp_path):
    """(stage-1 folder, stage-2 folder): a tiny VQRAE saved, then the same tokenizer after a stage-2 change of its
    encoder only (codebook, spec and config untouched), as a stage-2 run leaves it."""
    stage1 = build_tokenizer("vqrae-tiny", seed=0)
    stage1.save_pretrained(tmp_path / "vqrae_stage1")
    stage2 = load_tokenizer(tmp_path / "vqrae_stage1")
    stage2.set_stage(2)
    with torch.no_grad():
        next(stage2.encoder.parameters()).add_(1e-3)
    stage2.drop_teacher()
    stage2.save_pretrained(tmp_path / "vqrae_stage2")
    return tmp_path / "vqrae_stage1", tmp_path / "vqrae_stage2"


def test_identity_is_stable_and_tells_stage_1_from_stage_2(stages):
    stage1_dir, stage2_dir = stages
    stage1, again, stage2 = load_tokenizer(stage1_dir), load_tokenizer(stage1_dir), load_tokenizer(stage2_dir)
    assert stage1.codebook_spec == stage2.codebook_spec and stage1.config_hash() == stage2.config_hash()
    assert all(torch.equal(a, b) for a, b in zip(stage1.quantizer.state_dict().values(),
                                                 stage2.quantizer.state_dict().values()))  # same codebook too
    first, second = visual_tokenizer_identity(stage1), visual_tokenizer_identity(stage2)
    assert visual_tokenizer_identity(again) == first  # stable across loads
    assert first["config_hash"] == stage1.config_hash() and first["path"] == str(stage1_dir.resolve())
    assert first["model_type"] == "unimm_vqrae"
    assert first["weights_hash"] != second["weights_hash"]
    built = visual_tokenizer_identity(build_tokenizer("vqrae-tiny", seed=0))  # the in-memory original
    assert built["path"] is None and {k: built[k] for k in ("config_hash", "weights_hash")} == {
        k: first[k] for k in ("config_hash", "weights_hash")}


def test_from_llm_records_identity_through_save_and_load(stages, tiny_qwen2_path, tmp_path, caplog):
    stage1_dir, stage2_dir = stages
    stage1 = load_tokenizer(stage1_dir)
    model = UniMMForCausalLM.from_llm(tiny_qwen2_path, stage1, **HEAD_KWARGS)
    model.save_pretrained(tmp_path / "model")
    written = json.loads((tmp_path / "model" / "config.json").read_text())["visual_tokenizer_identity"]
    assert written == visual_tokenizer_identity(stage1)
    reloaded = UniMMForCausalLM.from_pretrained(tmp_path / "model")
    assert check_visual_tokenizer(reloaded.config, load_tokenizer(stage1_dir)) == written

    stage2 = load_tokenizer(stage2_dir)
    with pytest.raises(VisualTokenizerMismatchError) as error:
        check_visual_tokenizer(reloaded.config, stage2)
    message = str(error.value)
    other = visual_tokenizer_identity(stage2)
    for text in (written["weights_hash"], other["weights_hash"], str(stage1_dir.resolve()),
                 str(stage2_dir.resolve()), "allow_mismatch=True"):
        assert text in message
    with pytest.raises(VisualTokenizerMismatchError, match="config hash"):  # another kind of tokenizer altogether
        check_visual_tokenizer(reloaded.config, build_tokenizer("dualtoken-tiny", seed=0))
    with caplog.at_level(logging.WARNING, logger="unimm.llm.identity"):
        assert check_visual_tokenizer(reloaded.config, stage2, allow_mismatch=True) == other
    assert "visual tokenizer mismatch" in caplog.text and other["weights_hash"] in caplog.text


def test_model_without_identity_loads_with_one_warning(stages, tiny_qwen2_path, tmp_path, caplog):
    """Models saved before identities were recorded (built from a spec, not a tokenizer) still load."""
    stage1 = load_tokenizer(stages[0])
    model = UniMMForCausalLM.from_llm(tiny_qwen2_path, stage1.codebook_spec, **HEAD_KWARGS)
    model.save_pretrained(tmp_path / "legacy")
    config = UniMMForCausalLM.from_pretrained(tmp_path / "legacy").config
    assert config.visual_tokenizer_identity is None
    with caplog.at_level(logging.WARNING, logger="unimm.llm.identity"):
        for _ in range(2):
            assert check_visual_tokenizer(config, stage1) == visual_tokenizer_identity(stage1)
    warnings = [r for r in caplog.records if "records no visual tokenizer identity" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path / "legacy") in warnings[0].getMessage()
    with pytest.raises(ValueError, match="needs config_hash and weights_hash"):
        UniMMConfig(visual_tokenizer_identity={"path": "somewhere"})


_CHILD = textwrap.dedent("""
    import importlib, sys
    import torch
    import unimm
    from transformers import AutoConfig, AutoModelForCausalLM

    path, batch_file, out = sys.argv[1:]
    assert type(AutoConfig.for_model("unimm")).__name__ == "UniMMConfig"  # registered by the import alone
    importlib.reload(unimm)  # registering again is harmless
    unimm.register_auto_classes()
    assert type(AutoConfig.for_model("unimm")).__name__ == "UniMMConfig"
    assert type(AutoConfig.from_pretrained(path)).__name__ == "UniMMConfig"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "UniMMForCausalLM", type(model)
    batch = torch.load(batch_file, weights_only=True)
    with torch.no_grad():
        torch.save(model(**batch).logits, out)
""")


def test_auto_classes_open_a_saved_model_in_a_fresh_process(tiny_qwen2_path, tmp_path):
    torch.manual_seed(0)
    spec = {"semantic": (64, 1)}
    model = UniMMForCausalLM.from_llm(tiny_qwen2_path, spec, **HEAD_KWARGS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    layout = extend_tokenizer_and_model(tokenizer, model, spec)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    batch = image_batch(tokenizer, layout, spec, ["a red circle", "two blue squares"], num_positions=4)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "batch.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
