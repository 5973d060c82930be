"""The quickstart over several seeds: one table row per run directory of `scripts/quickstart.sh` (its `scores.json`:
the figures with their counts, the guidance scale and how it was set, the time, the verdict), then
the mean and the minimum of each figure, and, with `--same A B`, whether two runs of one seed agree (every figure,
the chosen scale, the guidance table and the answers; every generated image and every weight and code file, byte for
byte).

    for s in 0 1 2 3 4; do QUICKSTART_OUT=runs/qs_s$s bash scripts/quickstart.sh --seed $s; done
    python benchmarks/quickstart_seeds.py runs/qs_s0 runs/qs_s1 runs/qs_s2 runs/qs_s3 runs/qs_s4
    python benchmarks/quickstart_seeds.py --same runs/qs_s0 runs/qs_s0_again
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

from unimm.cli.quickstart import count_text

# (scores.json key, column)
FIGURES = (("generation", "seen"), ("generation_held_out", "held-out"), ("qa", "QA"))


def _load(run: Path) -> dict:
    path = run / "scores.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no scores.json (is {run} a finished quickstart run directory?)")
    return json.loads(path.read_text())


def _elapsed(scores: dict) -> float | None:
    rows = [r for r in scores.get("judged", {}).get("rows", []) if r["figure"] == "time end to end"]
    return rows[0]["value"] if rows else None


def table(runs: list[Path]) -> str:
    lines = ["| run | seen | held-out | QA | guidance | time | targets met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    values: dict[str, list[float]] = {column: [] for _, column in FIGURES}
    times = []
    for run in runs:
        scores = _load(run)
        cells = []
        for key, column in FIGURES:
            entry = scores[key]
            values[column].append(entry["accuracy"])
            cells.append(f"{entry['accuracy']:.3f} ({count_text(entry)})")
        judged = [r for r in scores.get("judged", {}).get("rows", []) if r["verdict"] != "-"]
        met = f"{sum(r['verdict'] == 'pass' for r in judged)} of {len(judged)}" if judged else "-"
        elapsed = _elapsed(scores)
        if elapsed is not None:
            times.append(elapsed)
        guidance = scores.get("guidance", {})
        scale = "-" if guidance.get("chosen") is None else f"{guidance['chosen']:g}"
        if guidance.get("source"):  # the recipe's, or chosen on the validation captions
            scale += f" ({guidance['source']})"
        lines.append(f"| {run.name} | " + " | ".join(cells) + f" | {scale} | "
                     f"{'-' if elapsed is None else f'{elapsed:.0f} s'} | {met} |")
    for name, reduce in (("mean", statistics.fmean), ("min", min)):
        cells = [f"{reduce(values[column]):.3f}" for _, column in FIGURES]
        time_cell = "-"
        if times:
            time_cell = f"{statistics.fmean(times):.0f} s" if name == "mean" else f"{max(times):.0f} s (max)"
        lines.append(f"| **{name}** | " + " | ".join(cells) + f" | | {time_cell} | |")
    return "\n".join(lines)


# The files two runs of one seed must share byte for byte: the images stage 6 drew, and the weights and codes every
# stage before it wrote (tokenizer, both code caches, pretrained and finetuned model).
OUTPUTS = {"generated images": ("generated/*.png",),
           "weights and codes": ("tokenizer/model/*.safetensors", "code_cache*/*.arrow", "pretrain/*.safetensors",
                                 "finetune/*.safetensors")}


def _digests(run: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in patterns for p in sorted(run.glob(pattern))}


def _answers(run: Path) -> list[tuple[str, str]] | None:
    """(question, answer) of each held-out question (the image paths name the run folder, so they are left out)."""
    path = run / "answers.json"
    return [(row["question"], row["answer"]) for row in json.loads(path.read_text())] if path.is_file() else None


def same(first: Path, second: Path) -> bool:
    """Print what two runs of one seed share; True when every figure, the chosen scale, the guidance table, the
    answers and every image, weight and code file agree."""
    a, b = _load(first), _load(second)
    agree = True
    for key, column in FIGURES + (("tokenizer_reconstruction", "tokenizer reconstruction"), ("guidance", "guidance")):
        left = a.get(key, {}).get("chosen" if key == "guidance" else "accuracy")
        right = b.get(key, {}).get("chosen" if key == "guidance" else "accuracy")
        print(f"{column}: {left} vs {right} -> {'same' if left == right else 'DIFFERENT'}")
        agree &= left == right
    table_a, table_b = a.get("cfg_held_out", {}).get("rows"), b.get("cfg_held_out", {}).get("rows")
    print(f"guidance table: {'same' if table_a == table_b else 'DIFFERENT'} ({len(table_a or [])} rows)")
    answers_a, answers_b = _answers(first), _answers(second)
    print(f"answers: {'same' if answers_a == answers_b else 'DIFFERENT'} ({len(answers_a or [])} questions)")
    agree &= table_a == table_b and answers_a == answers_b
    for label, patterns in OUTPUTS.items():
        files_a, files_b = _digests(first, patterns), _digests(second, patterns)
        differing = sorted(name for name in files_a.keys() | files_b.keys() if files_a.get(name) != files_b.get(name))
        print(f"{label}: {len(files_a)} vs {len(files_b)} files, {len(differing)} differ"
              + (f" (e.g. {differing[:3]})" if differing else ""))
        agree &= not differing
    return agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="Quickstart run directories (QUICKSTART_OUT).")
    parser.add_argument("--same", nargs=2, type=Path, metavar=("A", "B"), help="Two runs of one seed to compare.")
    args = parser.parse_args(argv)
    if not args.runs and not args.same:
        parser.error("give run directories, or --same A B")
    if args.runs:
        print(table(args.runs))
    if args.same:
        return 0 if same(*args.same) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
