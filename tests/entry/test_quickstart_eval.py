"""`unimm.cli.quickstart` (`scripts/quickstart_eval.py`) without training: the held-out captions stay out of
every training file, and the generation scorer reports seen and held-out captions apart (checked on rendered
ground-truth images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from unimm.cli.quickstart import best_scale, make_parser
from unimm.data.toy.shapes import COLOURS, POSITIONS, SHAPES, all_combinations, render_shape

REPO = Path(__file__).resolve().parents[2]


def _main(argv):
    args = make_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def quickstart_eval():
    return SimpleNamespace(main=_main)


@pytest.fixture(scope="module")
def prepared(quickstart_eval, tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    quickstart_eval.main(["prepare", "--out", str(out), "--train_samples", "120", "--test_samples", "4",
                          "--num_prompts", "8", "--partial_captions", "0.5", "--scenes", "0.25", "--hidden_size", "32",
                          "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1"])
    return out


def test_held_out_captions_are_in_no_training_file(prepared):
    held_out = json.loads((prepared / "data" / "held_out_prompts.json").read_text())
    assert len(held_out) == 24
    records = [json.loads(line) for line in (prepared / "data" / "train" / "captions.jsonl").read_text().split("\n")
               if line]
    attributes = {c.caption: (c.colour, c.shape, c.position) for c in all_combinations()}
    held_attributes = {attributes[c] for c in held_out}
    singles = [r for r in records if "objects" not in r]
    scenes = [r for r in records if "objects" in r]
    assert not {(r["colour"], r["shape"], r["position"]) for r in singles} & held_attributes
    assert not {(o["colour"], o["shape"], o["position"]) for r in scenes for o in r["objects"]} & held_attributes
    assert not [(caption, r["text"]) for r in records for caption in held_out if caption in r["text"]]
    # --scenes 0.25: 30 two-shape images of their own.
    assert len(scenes) == 30 and all(len(r["objects"]) == 2 and ", " in r["text"] for r in scenes)
    assert all((prepared / "data" / "train" / r["image"]).is_file() for r in scenes)
    for record in json.loads((prepared / "data" / "train" / "llava.json").read_text()):
        assert not {turn["value"] for turn in record["conversations"]} & set(held_out)
    # --partial_captions 0.5: 60 more records naming only the position, on the same image files.
    partial = [r for r in records if r["id"].endswith("-part")]
    assert len(records) == 210 and len(partial) == 60
    assert all(r["text"] == r["position"] and r["text"] in POSITIONS for r in partial)
    assert all((prepared / "data" / "train" / r["image"]).is_file() for r in partial)
    # --num_prompts 8: 4 held-out captions first, then 4 seen ones.
    prompts = [p for p in (prepared / "data" / "prompts.txt").read_text().split("\n") if p]
    assert len(prompts) == 8 and set(prompts[:4]) <= set(held_out) and not set(prompts[4:]) & set(held_out)


def test_validation_captions_are_a_split_of_the_seen_ones_apart_from_the_held_out_ones(quickstart_eval, tmp_path):
    quickstart_eval.main(["prepare", "--out", str(tmp_path), "--train_samples", "200", "--test_samples", "1",
                          "--validation_prompts", "6", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
                          "--num_kv_heads", "1"])
    data = tmp_path / "data"
    held_out = set(json.loads((data / "held_out_prompts.json").read_text()))
    validation = json.loads((data / "validation_prompts.json").read_text())
    assert len(held_out) == 24 and len(validation) == 6 and not held_out & set(validation)
    records = [json.loads(line) for line in (data / "train" / "captions.jsonl").read_text().split("\n") if line]
    trained = {r["text"] for r in records}
    assert len(trained) == 72 - 24 and set(validation) <= trained and not trained & held_out
    # Every colour, shape and position is still trained on; the validation captions are spread over the pairs.
    assert {r["colour"] for r in records} == set(COLOURS) and {r["shape"] for r in records} == set(SHAPES)
    assert {r["position"] for r in records} == set(POSITIONS)
    attributes = {c.caption: c for c in all_combinations()}
    assert len({(attributes[c].colour, attributes[c].shape) for c in validation}) == 6
    # Validation captions are prompts of the guidance choice only, not of the reported generation figures.
    prompts = [p for p in (data / "prompts.txt").read_text().split("\n") if p]
    assert not set(prompts) & set(validation) and held_out <= set(prompts) and len(prompts) == 24 + 42


def test_the_guidance_scale_is_the_one_most_often_right_and_the_smallest_on_a_tie():
    def rows(greedy, sampled):
        return ([{"decoding": "greedy", "cfg_scale": s, "accuracy": a / 6, "num_images": 6} for s, a in greedy.items()]
                + [{"decoding": "sampled", "cfg_scale": s, "accuracy": a / 24, "num_images": 24}
                   for s, a in sampled.items()])

    assert best_scale(rows({1.0: 4, 1.5: 5, 2.0: 6, 3.0: 6}, {1.0: 20, 1.5: 21, 2.0: 22, 3.0: 20})) == (2.0, 28)
    assert best_scale(rows({1.0: 6, 1.5: 5, 2.0: 6, 3.0: 3}, {1.0: 20, 1.5: 21, 2.0: 20, 3.0: 20})) == (1.0, 26)
    assert best_scale(rows({1.0: 2, 2.0: 3}, {})) == (2.0, 3)


def test_a_recipe_guidance_scale_is_kept_without_drawing_anything(quickstart_eval, prepared, capsys):
    # `--scale` (quickstart.sh --guidance 1, the DualToken default): no model is loaded (the paths do not exist), the
    # scale is written where stage 6 reads it and recorded with where it came from.
    argv = ["guidance", "--out", str(prepared), "--model_path", "/nonexistent/model",
            "--visual_tokenizer_path", "/nonexistent/tokenizer"]
    assert quickstart_eval.main(argv + ["--scale", "1.5"]) == 1.5
    assert (prepared / "guidance_scale").read_text() == "1.5\n"
    guidance = json.loads((prepared / "scores.json").read_text())["guidance"]
    assert guidance["chosen"] == 1.5 and guidance["source"] == "recipe" and guidance["rows"] == []
    assert "guidance: scale 1.5, the recipe's (not chosen on this run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--scale must be 1 \\(no guidance\\) or more, got 0.5"):
        quickstart_eval.main(argv + ["--scale", "0.5"])


@pytest.mark.parametrize("value", ["0.5", "two", "-1"])
def test_quickstart_refuses_a_guidance_that_is_neither_validation_nor_a_scale_before_any_work(tmp_path, value):
    out = tmp_path / "run"
    result = subprocess.run(["bash", "scripts/quickstart.sh", "--guidance", value],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QUICKSTART_OUT": str(out)})
    assert result.returncode == 2
    assert f"--guidance must be validation or a scale of 1 (no guidance) or more, got {value}" in result.stderr
    assert not out.exists()


def test_generation_scores_seen_and_held_out_captions_apart(quickstart_eval, prepared, tmp_path, capsys):
    prompts = [p for p in (prepared / "data" / "prompts.txt").read_text().split("\n") if p]
    combos = {c.caption: c for c in all_combinations()}
    index = []
    for i, prompt in enumerate(prompts):
        c = combos[prompt]
        # right images for the seen captions; for the held-out ones the right colour and shape, wrong quadrant
        position = c.position if i >= 4 else POSITIONS[(POSITIONS.index(c.position) + 1) % 4]
        render_shape(c.colour, c.shape, position, extent=0.42).save(tmp_path / f"{i}.png")
        index.append({"prompt": prompt, "file": f"{i}.png"})
    (tmp_path / "prompts.json").write_text(json.dumps(index))
    quickstart_eval.main(["generation", "--out", str(prepared), "--generated_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "generation accuracy: 1.000 (captions seen in training" in printed
    assert "held-out generation accuracy: 0.000 (captions never trained on" in printed
    scores = json.loads((prepared / "scores.json").read_text())
    assert scores["generation"]["num_images"] == 4 and scores["generation"]["accuracy"] == 1.0
    assert scores["generation_held_out"]["colour_and_shape"] == 1.0
    assert scores["generation_held_out"]["position"] == 0.0



def test_prepare_writes_the_tiny_llm_with_the_attention_dropout_asked_for(quickstart_eval, prepared, tmp_path):
    assert json.loads((prepared / "llm" / "config.json").read_text())["attention_dropout"] == 0.0
    quickstart_eval.main(["prepare", "--out", str(tmp_path), "--train_samples", "72", "--test_samples", "1",
                          "--num_prompts", "2", "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2",
                          "--num_kv_heads", "1", "--attention_dropout", "0.1"])
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert config["attention_dropout"] == 0.1 and config["hidden_size"] == 32


def test_judge_prints_each_figure_with_its_count_target_and_verdict_and_exits_0(tmp_path):
    """The quickstart's last command: a missed target is a FAIL row, not a failing program."""

    from tests.entry.conftest import REPO

    (tmp_path / "scores.json").write_text(json.dumps({
        "generation": {"accuracy": 0.95, "num_images": 60},
        "generation_held_out": {"accuracy": 0.75, "num_images": 24},
        "qa": {"accuracy": 0.9, "num_questions": 216},
    }))
    proc = subprocess.run([sys.executable, "scripts/quickstart_eval.py", "judge", "--out", str(tmp_path),
                           "--elapsed", "731"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "| generation, seen captions | 0.950 (57/60) | >= 0.9 | pass |" in lines
    assert "| generation, held-out captions | 0.750 (18/24) | >= 0.8 | FAIL |" in lines
    assert "| QA on held-out images | 0.900 (194/216) | >= 0.9 | pass |" in lines
    assert "| time end to end | 731 s | <= 900 s | pass |" in lines
    assert any(line.startswith("3 of 4 targets met") for line in lines)
    judged = json.loads((tmp_path / "scores.json").read_text())["judged"]
    assert [row["verdict"] for row in judged["rows"]] == ["pass", "FAIL", "pass", "pass"]
    vqrae = subprocess.run([sys.executable, "scripts/quickstart_eval.py", "judge", "--out", str(tmp_path),
                            "--tokenizer", "vqrae"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert vqrae.returncode == 0 and "| generation, held-out captions | 0.750 (18/24) | reported | - |" in vqrae.stdout
    assert "2 of 2 targets met" in vqrae.stdout


def _fake_run(quickstart_eval, folder, seen, held, qa, guidance, elapsed, image_colour, source=None,
              weights=b"weights"):
    """A run directory as `scripts/quickstart.sh` leaves it, as far as `benchmarks/quickstart_seeds.py` reads it."""
    folder.mkdir()
    (folder / "pretrain").mkdir()
    (folder / "pretrain" / "model.safetensors").write_bytes(weights)
    (folder / "answers.json").write_text(json.dumps([{"image": str(folder / "x.png"), "question": "What shape is it?",
                                                      "answer": "circle"}]))
    (folder / "scores.json").write_text(json.dumps({
        "generation": {"accuracy": seen / 42, "num_images": 42},
        "generation_held_out": {"accuracy": held / 24, "num_images": 24},
        "qa": {"accuracy": qa / 216, "num_questions": 216},
        "guidance": {"chosen": guidance, **({"source": source} if source else {})}}))
    quickstart_eval.main(["judge", "--out", str(folder), "--elapsed", str(elapsed)])
    (folder / "generated").mkdir()
    Image.new("RGB", (8, 8), image_colour).save(folder / "generated" / "0000_a.png")


def test_seeds_table_gives_each_run_with_counts_then_mean_and_min_and_compares_two_runs(quickstart_eval, tmp_path,
                                                                                       capsys):
    _fake_run(quickstart_eval, tmp_path / "s0", 42, 22, 210, 2.0, 600, (255, 0, 0))
    _fake_run(quickstart_eval, tmp_path / "s1", 40, 18, 200, 1.0, 650, (255, 0, 0), source="recipe")
    _fake_run(quickstart_eval, tmp_path / "s0_again", 42, 22, 210, 2.0, 610, (255, 0, 0))
    _fake_run(quickstart_eval, tmp_path / "s0_other", 42, 22, 210, 2.0, 610, (0, 0, 255))
    capsys.readouterr()
    script = [sys.executable, "benchmarks/quickstart_seeds.py"]
    table = subprocess.run(script + [str(tmp_path / "s0"), str(tmp_path / "s1")], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout
    assert "| s0 | 1.000 (42/42) | 0.917 (22/24) | 0.972 (210/216) | 2 | 600 s | 4 of 4 |" in table
    assert "| s1 | 0.952 (40/42) | 0.750 (18/24) | 0.926 (200/216) | 1 (recipe) | 650 s | 3 of 4 |" in table
    assert "| **mean** | 0.976 | 0.833 | 0.949 | | 625 s | |" in table
    assert "| **min** | 0.952 | 0.750 | 0.926 | | 650 s (max) | |" in table
    agree = subprocess.run(script + ["--same", str(tmp_path / "s0"), str(tmp_path / "s0_again")],
                           capture_output=True, text=True, cwd=REPO)
    assert agree.returncode == 0 and "generated images: 1 vs 1 files, 0 differ" in agree.stdout
    differ = subprocess.run(script + ["--same", str(tmp_path / "s0"), str(tmp_path / "s0_other")],
                            capture_output=True, text=True, cwd=REPO)
    assert differ.returncode == 1 and "1 differ" in differ.stdout
    # the answers name their run folder's images: only questions and answers are compared
    assert "answers: same (1 questions)" in agree.stdout and "weights and codes: 1 vs 1 files, 0 differ" in agree.stdout
    _fake_run(quickstart_eval, tmp_path / "s0_weights", 42, 22, 210, 2.0, 610, (255, 0, 0), weights=b"other")
    weights = subprocess.run(script + ["--same", str(tmp_path / "s0"), str(tmp_path / "s0_weights")],
                             capture_output=True, text=True, cwd=REPO)
    assert weights.returncode == 1 and "weights and codes: 1 vs 1 files, 1 differ" in weights.stdout
    assert "generated images: 1 vs 1 files, 0 differ" in weights.stdout


def _update_many(out: str, worker: int, count: int) -> None:
    from unimm.cli.quickstart import _update_scores

    for k in range(count):
        _update_scores(Path(out), f"w{worker}-{k}", {"accuracy": k / count})


def test_scores_updates_from_concurrent_processes_all_land(tmp_path):
    """Stage 6's lanes write scores.json at the same time: every entry of every process is kept, and the file is
    whole JSON at the end (an unlocked read-change-write loses entries here)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_update_many, args=(str(tmp_path), w, 40)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert sorted(scores) == sorted(f"w{w}-{k}" for w in range(4) for k in range(40))
    assert not list(tmp_path.glob("scores.json.*.tmp"))
