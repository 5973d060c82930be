"""`scripts/quickstart.sh --tokenizer vqrae --fast`: the VQRAE way through every stage. Understanding reads pixels
(the captions as one-turn conversations in pretraining, the questions in finetuning) through `encode_features` and
the model's feature projector; generation reads and writes SimVQ codes. Fast mode trains a few steps, so the
accuracies are checked for form, not for targets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_vqrae_fast_understands_from_features_and_generates_codes(tmp_path):
    out = tmp_path / "quickstart_vqrae"
    env = {**os.environ, "QUICKSTART_OUT": str(out), "QUICKSTART_MASTER_PORT": str(free_port(consecutive=2))}
    build_deepspeed_comm_op(env)
    result = run_process_group(["bash", "scripts/quickstart.sh", "--fast", "--tokenizer", "vqrae"], timeout=1200,
                               cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert re.findall(r"=== \[\d+s\] (\d)/7", result.stdout) == [str(i) for i in range(1, 8)]

    # Pretraining understood the captions from pixels: one-turn conversations of the training captions.
    captions = {json.loads(line)["text"] for line in (out / "data" / "train" / "captions.jsonl").read_text().split("\n")
                if line}
    records = json.loads((out / "data" / "train" / "captions_llava.json").read_text())
    assert {r["conversations"][1]["value"] for r in records} == captions
    assert all((out / "data" / "train" / r["image"]).is_file() for r in records)
    # Both trained models carry the feature projector sized to the tokenizer's features; no conversation codes.
    tokenizer_config = json.loads((out / "tokenizer" / "model" / "config.json").read_text())
    assert tokenizer_config["model_type"] == "unimm_vqrae"
    for stage in ("pretrain", "finetune"):
        resolved = (out / stage).glob("*.yaml")
        assert any("understanding_input: features" in path.read_text() for path in resolved), stage
    pretrained = json.loads((out / "pretrain" / "config.json").read_text())
    assert pretrained["feature_dim"] == tokenizer_config["encoder_config"]["hidden_size"]
    assert not (out / "code_cache_llava").exists()

    printed = {name: float(value) for name, value in re.findall(
        r"^(tokenizer reconstruction|generation|held-out generation|QA) accuracy: ([0-9.]+)", result.stdout, re.M)}
    assert set(printed) == {"tokenizer reconstruction", "generation", "held-out generation", "QA"}
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 3 * 12 and all(isinstance(row["answer"], str) for row in answers)
    generated = json.loads((out / "generated" / "prompts.json").read_text())
    assert generated and all((out / "generated" / row["file"]).is_file() for row in generated)
    # VQRAE's guidance scale is chosen on the validation captions (greedy and sampled, scales 1 to 3), and stage 6
    # draws at it.
    guidance = json.loads((out / "scores.json").read_text())["guidance"]
    assert guidance["source"] == "validation" and guidance["chosen"] in (1.0, 1.5, 2.0, 3.0)
    assert sorted({row["cfg_scale"] for row in guidance["rows"]}) == [1.0, 1.5, 2.0, 3.0]
    assert f"guidance: scale {guidance['chosen']:g} chosen on the validation captions" in result.stdout
    assert f"generating greedily at guidance scale {guidance['chosen']:g}\n" in result.stdout


def test_prepare_writes_the_captions_as_one_turn_conversations(tmp_path):
    from unimm.cli.quickstart import make_parser
    from unimm.data.sources import read_llava_json
    from unimm.data.toy.shapes import DESCRIBE_QUESTION

    argv = ["prepare", "--out", str(tmp_path), "--train_samples", "40", "--test_samples", "2", "--num_prompts", "4",
            "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1"]
    args = make_parser().parse_args([*argv, "--caption_conversations", "true"])
    args.func(args)
    train = tmp_path / "data" / "train"
    rows = [json.loads(line) for line in (train / "captions.jsonl").read_text().split("\n") if line]
    records = read_llava_json(train / "captions_llava.json")
    assert len(records) == len(rows) == 40
    for row, record in zip(rows, json.loads((train / "captions_llava.json").read_text())):
        assert record["image"] == row["image"] and (train / record["image"]).is_file()
        assert record["conversations"] == [{"from": "human", "value": f"<image>\n{DESCRIBE_QUESTION}"},
                                           {"from": "gpt", "value": row["text"]}]
    with pytest.raises(SystemExit):
        make_parser().parse_args([*argv, "--caption_conversations", "maybe"])
    default = make_parser().parse_args(argv)
    assert default.caption_conversations is False
