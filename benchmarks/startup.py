"""Training start-up against data size, with `--group_by_modality_length`: the time from building the dataset to
the first batch out of the sampler and the collator, and the peak RSS, at 10^3 .. 10^6 records.

Two mixtures, written in a temporary folder with the current code (nothing is committed):
- pretrain: caption + t2i from a code cache written by `write_code_cache` (the pretokenize shard writer, random
  codes of vqrae-tiny's shape [64, 1], captions of 1-4 English sentences);
- finetune: LLaVA conversations (a `.json` list, 1-3 turn pairs, one image each) whose images come from that cache.

A LLaVA file of 8 MiB or more is converted to Arrow at its first read (`read_llava_json`), so finetune is measured
twice with the current code: the first start (parse + conversion) and the second (memory-mapped conversion).

Each measurement runs in a fresh process: the text tokenizer (Qwen2.5's, from the qwen-agent wheel, with UniMM's
tokens added) is loaded untimed, then `build_mixture` (cache opened and every shard checksum verified, LLaVA file
read), `modality_length_sampler`, the first batch's indices, its samples and `UniMMCollator` are timed. `--baseline
REF` also measures the code of git revision REF (extracted with `git archive`): the old sampler builds every sample,
so it runs at `--baseline_sizes` only, and its per-record cost is extrapolated linearly to the larger sizes.

    OMP_NUM_THREADS=1 python benchmarks/startup.py --sizes 1000 100000 1000000 --baseline 22517b1 \
        --baseline_sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_POSITIONS = 64  # vqrae-tiny: 32 px images, 64 positions of depth 1


def _status_mib(field: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (peak) of this process. Not `getrusage`'s ru_maxrss: Linux carries it over
    `execve`, so a child would report the parent's peak (the data generator's) when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _text_tokenizer(folder: Path):
    """Qwen2.5's tokenizer, built once from the qwen-agent wheel into `folder`."""
    from transformers import AutoTokenizer

    from unimm.testing import QWEN_AGENT_WHEEL, build_qwen2_tokenizer, wheel_member

    if not (folder / "tokenizer_config.json").exists():
        cache = Path(os.environ.get("UNIMM_TEST_ASSETS", Path.home() / ".cache" / "unimm-test-assets"))
        build_qwen2_tokenizer(wheel_member(*QWEN_AGENT_WHEEL, cache), folder)
    return AutoTokenizer.from_pretrained(folder)


def _english_lines() -> list[str]:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line]


def generate(folder: Path, num_records: int, seed: int = 0) -> None:
    """The code cache and the LLaVA file of `num_records` records in `folder`."""
    import numpy as np
    import torch

    from unimm.data.code_cache import write_code_cache
    from unimm.tokenizer import build_tokenizer

    rng = np.random.default_rng(seed)
    lines = np.array(_english_lines())
    torch.manual_seed(0)
    visual = build_tokenizer("vqrae-tiny").eval()
    ids = [f"img{i:07d}" for i in range(num_records)]

    def texts(count: int, low: int, high: int) -> list[str]:
        picks = rng.integers(0, len(lines), size=(count, high))
        lengths = rng.integers(low, high + 1, size=count)
        return [" ".join(lines[row[:n]]) for row, n in zip(picks, lengths)]

    codes = {"semantic": rng.integers(0, 512, size=(num_records, IMAGE_POSITIONS, 1), dtype=np.int32)}
    write_code_cache(folder / "cache", visual, ids, codes, texts(num_records, 1, 4), shard_size=16384)
    del codes
    questions, answers = texts(num_records * 3, 1, 1), texts(num_records * 3, 1, 3)
    pairs = rng.integers(1, 4, size=num_records)
    with open(folder / "llava.json", "w") as f:
        f.write("[")
        for i, (key, count) in enumerate(zip(ids, pairs)):
            turns = []
            for j in range(count):
                question = ("<image>\n" if j == 0 else "") + questions[3 * i + j]
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answers[3 * i + j]}]
            f.write(("," if i else "") + json.dumps({"id": str(i), "image": key, "conversations": turns}))
        f.write("]")


def measure(folder: Path, scenario: str, batch_size: int) -> dict:
    """One start-up, timed from `build_mixture` to the first collated batch (run in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from unimm.data.collator import UniMMCollator
    from unimm.data.mixture import MixtureConfig, build_mixture
    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.llm.vocab import extend_tokenizer_and_model
    from unimm.testing import tiny_llm_config
    from unimm.train.llm.trainer import modality_length_sampler

    torch.set_num_threads(1)
    tokenizer = _text_tokenizer(folder.parent / "qwen2.5")
    config = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    spec = {"semantic": {"num_codes": 512, "depth": 1, "code_dim": 32}}
    layout = extend_tokenizer_and_model(tokenizer, AutoModelForCausalLM.from_config(config), spec)
    factory = SampleFactory(tokenizer, layout, SampleConfig(max_length=2048))
    if scenario == "pretrain":
        mixture = MixtureConfig(code_cache=str(folder / "cache"), caption_weight=1.0, t2i_weight=1.0)
    else:
        mixture = MixtureConfig(conversation_json=str(folder / "llava.json"), caption_weight=0.0, t2i_weight=0.0,
                                conversation_weight=1.0, conversation_code_cache=str(folder / "cache"),
                                understanding_input="codes")
    collator = UniMMCollator(pad_token_id=tokenizer.pad_token_id)
    rss_before = _status_mib("VmRSS")
    start = time.perf_counter()
    dataset = build_mixture(mixture, factory)
    built = time.perf_counter()
    sampler = modality_length_sampler(dataset, batch_size, seed=0)
    sampled = time.perf_counter()
    order = iter(sampler)
    batch = collator([dataset[next(order)] for _ in range(batch_size)])
    end = time.perf_counter()
    assert batch["input_ids"].shape[0] == batch_size
    return {"dataset_s": built - start, "sampler_s": sampled - built, "first_batch_s": end - sampled,
            "total_s": end - start, "rss_before_mib": rss_before,
            "peak_rss_mib": _status_mib("VmHWM"), "num_samples": len(dataset)}


def _run_measure(code: Path, folder: Path, scenario: str, batch_size: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(folder / "hf_datasets")}  # where a large LLaVA file's Arrow conversion goes
    out = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--scenario", scenario,
                          "--batch_size", str(batch_size)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({code}, {folder}, {scenario}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000, 1000000])
    parser.add_argument("--baseline", default=None, help="git revision whose code is measured as 'before'")
    parser.add_argument("--baseline_sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--scenarios", nargs="+", default=["pretrain", "finetune"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="pretrain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.scenario, args.batch_size)))
        return

    with tempfile.TemporaryDirectory(prefix="unimm_startup_") as tmp:
        tmp = Path(tmp)
        codes = {"after": REPO}
        if args.baseline:
            (tmp / "baseline").mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "unimm"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp / "baseline")], input=archive, check=True)
            codes["before"] = tmp / "baseline"
        _text_tokenizer(tmp / "qwen2.5")
        rows = []
        sizes = sorted(set(args.sizes) | (set(args.baseline_sizes) if args.baseline else set()))
        for size in sizes:
            folder = tmp / f"n{size}"
            folder.mkdir()
            start = time.perf_counter()
            generate(folder, size)
            print(f"# {size} records generated in {time.perf_counter() - start:.1f} s "
                  f"(cache {sum(p.stat().st_size for p in (folder / 'cache').iterdir()) / 2**20:.0f} MiB, "
                  f"llava.json {(folder / 'llava.json').stat().st_size / 2**20:.0f} MiB)", flush=True)
            for name, code in codes.items():
                if name == "after" and size not in args.sizes:
                    continue
                if name == "before" and size not in args.baseline_sizes:
                    continue
                for scenario in args.scenarios:
                    result = _run_measure(code, folder, scenario, args.batch_size)
                    rows.append({"code": name, "records": size, "scenario": scenario, **result})
                    print(json.dumps(rows[-1]), flush=True)
                    if scenario == "finetune" and name == "after":  # again: reads the Arrow conversion if one was made
                        result = _run_measure(code, folder, scenario, args.batch_size)
                        rows.append({"code": name, "records": size, "scenario": "finetune, 2nd start", **result})
                        print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder)
        print("\n| code | scenario | records | dataset s | sampler s | first batch s | total s | peak RSS MiB "
              "(before MiB) |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['code']} | {row['scenario']} | {row['records']:,} | {row['dataset_s']:.2f} | "
                  f"{row['sampler_s']:.2f} | {row['first_batch_s']:.2f} | {row['total_s']:.2f} | "
                  f"{row['peak_rss_mib']:.0f} ({row['rss_before_mib']:.0f}) |")
        for scenario in args.scenarios:
            before = [r for r in rows if r["code"] == "before" and r["scenario"] == scenario]
            if before:
                largest = max(before, key=lambda r: r["records"])
                per_record = largest["sampler_s"] / largest["records"]
                print(f"# before, {scenario}: sampler {per_record * 1e3:.2f} ms per record at "
                      f"{largest['records']:,} -> extrapolated " + ", ".join(
                          f"{n:,}: {per_record * n / 60:.1f} min" for n in args.sizes))


if __name__ == "__main__":
    main()
