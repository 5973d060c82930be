"""`scripts/quickstart.sh --fast`: every stage of the CPU quickstart runs through the real entry points (tokenizer
training, pretokenize, 2-rank DeepSpeed pretraining and LoRA finetuning, generation, chat) and the scores are
printed (generation apart on seen and held-out captions, and the guidance comparison). The fast mode trains for a
few steps only, so the accuracies are checked for form, not for targets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from unimm.testing import build_deepspeed_comm_op, free_port, run_process_group

REPO = Path(__file__).resolve().parents[2]
# The fast tokenizer (100 steps) already keeps every shape in its quadrant: a --fast run measured position accuracy
# 1.00 (all attributes 0.58) on its 12 held-out reconstructions (benchmarks/results/quickstart.md); 0.75 leaves
# room for 12-image noise.
POSITION_FLOOR = 0.75


@pytest.mark.slow
def test_quickstart_fast_runs_every_stage(tmp_path):
    out = tmp_path / "quickstart"
    # QUICKSTART_RERANK: the images lane also draws 2 sampled candidates per prompt and keeps the best (off by default)
    env = {**os.environ, "QUICKSTART_OUT": str(out), "QUICKSTART_MASTER_PORT": str(free_port(consecutive=2)),
           "QUICKSTART_RERANK": "2"}
    build_deepspeed_comm_op(env)
    result = run_process_group(["bash", "scripts/quickstart.sh", "--fast"], timeout=1500, cwd=REPO, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    stages = re.findall(r"=== \[\d+s\] (\d)/7", result.stdout)
    assert stages == [str(i) for i in range(1, 8)], result.stdout[-3000:]
    for path in ("llm/config.json", "tokenizer/model/config.json", "tokenizer/model/model.safetensors",
                 "code_cache/cache_info.json", "code_cache_llava/cache_info.json", "pretrain/config.json",
                 "generated/grid.png", "generated/prompts.json", "answers.json", "scores.json"):
        assert (out / path).is_file(), path
    assert any((out / "finetune").iterdir())

    generated = json.loads((out / "generated" / "prompts.json").read_text())
    prompts = (out / "data" / "prompts.txt").read_text().split("\n")
    assert [row["prompt"] for row in generated] == [p for p in prompts if p]
    assert all((out / "generated" / row["file"]).is_file() for row in generated)
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 3 * 12 and all(isinstance(row["answer"], str) for row in answers)

    # The default holds captions out: never a training caption (t2i prompt / caption target) nor a conversation's
    # answer, and prompted next to seen captions.
    held_out = json.loads((out / "data" / "held_out_prompts.json").read_text())
    validation = json.loads((out / "data" / "validation_prompts.json").read_text())
    assert len(held_out) == 24 and len(validation) == 6
    trained = {json.loads(line)["text"] for line in (out / "data" / "train" / "captions.jsonl").read_text().split("\n")
               if line}
    for record in json.loads((out / "data" / "train" / "llava.json").read_text()):
        trained |= {turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"}
    assert not trained & set(held_out) and set(validation) <= trained
    assert 0 < sum(p in held_out for p in prompts if p) < len([p for p in prompts if p])

    printed = {name: float(value) for name, value in re.findall(
        r"^(tokenizer reconstruction|generation|held-out generation|QA) accuracy: ([0-9.]+)", result.stdout, re.M)}
    assert set(printed) == {"tokenizer reconstruction", "generation", "held-out generation", "QA"}, \
        result.stdout[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert printed["generation"] == pytest.approx(scores["generation"]["accuracy"], abs=1e-3)
    assert printed["held-out generation"] == pytest.approx(scores["generation_held_out"]["accuracy"], abs=1e-3)
    assert scores["generation_held_out"]["num_images"] == sum(p in held_out for p in prompts if p)
    # The guidance comparison: cfg 1 to 3, greedy and sampled, on the held-out prompts; one cell per scale.
    rows = scores["cfg_held_out"]["rows"]
    assert sorted((row["decoding"].split()[0], row["cfg_scale"]) for row in rows) == [
        (mode, scale) for mode in ("greedy", "sampled") for scale in (1.0, 1.25, 1.5, 2.0, 3.0)]
    assert "| decoding | cfg 1 (none) | cfg 1.25 | cfg 1.5 | cfg 2 | cfg 3 |" in result.stdout
    held_out_table = result.stdout.split("held-out generation accuracy by guidance scale")[-1]
    table = re.findall(r"^\| (greedy|sampled \(temperature 1, top-k \d+\)) \|(.*)\|$", held_out_table, re.M)
    assert [mode.split()[0] for mode, _ in table] == ["greedy", "sampled"], result.stdout[-3000:]
    for mode, cells in table:
        by_scale = {row["cfg_scale"]: row["accuracy"] for row in rows if row["decoding"].startswith(mode.split()[0])}
        assert [float(cell.split()[0]) for cell in cells.split("|")] == pytest.approx(
            [by_scale[scale] for scale in (1.0, 1.25, 1.5, 2.0, 3.0)], abs=1e-3)
    # Stage 6 drew at the DualToken recipe's scale, 1 (no guidance), without a validation pass (the VQRAE run chooses
    # on the validation captions: tests/entry/test_quickstart_vqrae.py).
    guidance = scores["guidance"]
    assert guidance["validation_prompts"] == 6 and guidance["chosen"] == 1.0 and guidance["source"] == "recipe"
    assert guidance["rows"] == [] and "validation generation accuracy by guidance scale" not in result.stdout
    assert "guidance: scale 1, the recipe's" in result.stdout
    assert "generating greedily at guidance scale 1, each image then the best of it and 2 sampled ones\n" in result.stdout
    # the images are reranked: each prompt's choice among the greedy image and 2 samples is reported
    rerank = json.loads((out / "generated" / "rerank.json").read_text())
    assert [c["prompt"] for c in rerank["choices"]] == [row["prompt"] for row in generated]
    assert all(len(c["caption_nll"]) == len(c["image_nll"]) == 3 for c in rerank["choices"])
    assert scores["rerank"] == {"samples": 2, "prompts": len(generated),
                                "kept_configured": sum(c["chosen"] == 0 for c in rerank["choices"])}
    assert "reranked: each image the best of" in result.stdout
    assert printed["QA"] == pytest.approx(scores["qa"]["accuracy"], abs=1e-3)
    # It judges itself last: each figure with its count against the README's target (a --fast run misses them and
    # still exits 0).
    assert "| figure | result | target | verdict |" in result.stdout
    assert [row["figure"] for row in scores["judged"]["rows"]][-1] == "time end to end"
    assert re.search(r"^\d of 4 targets met", result.stdout, re.M), result.stdout[-2000:]
    assert all(0.0 <= value <= 1.0 for value in printed.values())
    # Measured: even the fast tokenizer run puts the shape in the right quadrant of its reconstructions.
    assert scores["tokenizer_reconstruction"]["position"] >= POSITION_FLOOR
