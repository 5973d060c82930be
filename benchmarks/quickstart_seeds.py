"""The quickstart over several seeds: one table row per run directory of `scripts/quickstart.sh` (its `scores.json`:
the figures with their counts, the guidance scale and how it was set, the time, the verdict), then
the mean and the minimum of each figure, and, with `--same A B`, whether two runs of one seed agree (every figure,
the chosen scale and every generated image, byte for byte).

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


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def same(first: Path, second: Path) -> bool:
    """Print what two runs of one seed share; True when every figure, the chosen scale and every image agree."""
    a, b = _load(first), _load(second)
    agree = True
    for key, column in FIGURES + (("guidance", "guidance"),):
        left = a.get(key, {}).get("chosen" if key == "guidance" else "accuracy")
        right = b.get(key, {}).get("chosen" if key == "guidance" else "accuracy")
        print(f"{column}: {left} vs {right} -> {'same' if left == right else 'DIFFERENT'}")
        agree &= left == right
    images_a, images_b = _digests(first / "generated"), _digests(second / "generated")
    differing = sorted(name for name in images_a.keys() | images_b.keys() if images_a.get(name) != images_b.get(name))
    print(f"generated images: {len(images_a)} vs {len(images_b)}, {len(differing)} differ"
          + (f" (e.g. {differing[:3]})" if differing else ""))
    return agree and not differing


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
