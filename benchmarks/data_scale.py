"""The data path against data size: time to the first batch, peak RSS and samples/s at 10^3 .. 10^7 records, and
the bytes a code-cache record takes at DualToken-384's shape.

Synthetic data, generated with the current writers in a temporary folder deleted at the end (or in `--data_dir`,
kept and reused; nothing is committed; 10^7 records take 5.1 GiB):
- a code cache (`shard_table` / `write_shard` / `finalize_code_cache`, the pretokenize writers, shard by shard so
  the generator's memory stays flat): random codes of shape [16, 1] from a 512-code book (stored as int16) and
  captions of 1-4 English sentences, 16384 records per shard;
- a LLaVA conversation file in JSON Lines: 1-3 question/answer turn pairs per record, text only.

Time to the first batch and peak RSS are measured in a fresh process per run (one rank, dataloader in-process):
the text tokenizer (Qwen2.5's, from the qwen-agent wheel, with UniMM's tokens) is loaded untimed, the peak RSS
(VmHWM) is reset (`/proc/self/clear_refs`), then the sources (`CodeCacheShards`, or
`LlavaJsonShards(normalise=True)`, whose record index is built at the first start and memory-mapped at the next),
the sample builders (`SampleFactory` caption + t2i, or conversation) and the streaming mixture
(`unimm.data.streaming.StreamingMixture`, when this checkout has it; otherwise the shards read in order, which the
output says) are built and timed to the first collated batch (`UniMMCollator`). Peak RSS is the process's RSS at
the start of the data path plus what the data path adds; the growth column is the second part alone.

Samples/s (`--samples` samples drawn and collated after four warm-up batches) are measured in one process per
scenario in which the sizes take turns for `--throughput_rounds` rounds (median reported), so that the busy
moments of a shared machine spread over all sizes instead of landing on one; samples per second of the process's
CPU time are given beside them (the data path is one thread, its files in the page cache: CPU time is what the
work costs, without the other jobs' share of the cores).

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --sizes 1000 100000 1000000 10000000
    python benchmarks/data_scale.py --bytes   # bytes per image at DualToken-384's shape, int32 against int16
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import _english_lines, _status_mib, _text_tokenizer  # noqa: E402 - the start-up benchmark's helpers

REPO = Path(__file__).resolve().parents[1]
POSITIONS, NUM_CODES, SHARD_SIZE = 16, 512, 16384
SPEC = {"semantic": {"num_codes": NUM_CODES, "depth": 1, "code_dim": 8}}


class _SyntheticTokenizer:
    """What the cache writers ask of a visual tokenizer: identity, codebooks and image size (no weights)."""

    codebook_spec = SPEC
    image_size = 32

    def config_hash(self) -> str:
        return "synthetic-16x1-512"


def generate(folder: Path, num_records: int, seed: int = 0) -> None:
    """The code cache and the conversation JSONL of `num_records` records in `folder`, written shard by shard."""
    import numpy as np

    from unimm.data.code_cache import (
        STATE_FILE,
        finalize_code_cache,
        pretokenize_state,
        shard_table,
        write_json_atomic,
        write_shard,
    )

    rng = np.random.default_rng(seed)
    lines = np.array(_english_lines())
    tokenizer = _SyntheticTokenizer()

    def texts(count: int, low: int, high: int) -> list[str]:
        picks = rng.integers(0, len(lines), size=(count, high))
        lengths = rng.integers(low, high + 1, size=count)
        return [" ".join(lines[row[:n]]) for row, n in zip(picks, lengths)]

    cache = folder / "cache"
    cache.mkdir(parents=True)
    write_json_atomic(cache / STATE_FILE, pretokenize_state(tokenizer, "synthetic", num_records, SHARD_SIZE,
                                                            "synthetic"))
    shapes = {"semantic": [POSITIONS, 1]}
    with open(folder / "conversations.jsonl", "w") as conversations:
        for shard, start in enumerate(range(0, num_records, SHARD_SIZE)):
            stop = min(num_records, start + SHARD_SIZE)
            ids = [f"img{i:08d}" for i in range(start, stop)]
            codes = {"semantic": rng.integers(0, NUM_CODES, size=(stop - start, POSITIONS))}
            table = shard_table(ids, texts(stop - start, 1, 4), codes, SPEC)
            write_shard(cache, shard, start, stop, table, {"num_records": stop - start, "num_written": stop - start,
                                                           "skipped": [], "shapes": shapes})
            questions, answers = texts((stop - start) * 3, 1, 1), texts((stop - start) * 3, 1, 2)
            pairs = rng.integers(1, 4, size=stop - start)
            for i, count in enumerate(pairs):
                turns = []
                for j in range(count):
                    turns += [{"from": "human", "value": questions[3 * i + j]},
                              {"from": "gpt", "value": answers[3 * i + j]}]
                conversations.write(json.dumps({"id": str(start + i), "conversations": turns}) + "\n")
    finalize_code_cache(cache, tokenizer)


def _pipeline(folder: Path, scenario: str, factory, batch_size: int):
    """(mixture-or-stream, which path) for `scenario`."""
    import torch

    from unimm.data.sequence import ImageSlot, SampleError
    from unimm.data.shards import CodeCacheShards, LlavaJsonShards

    def codes(record: dict) -> dict:
        return {name: torch.as_tensor(value, dtype=torch.long) for name, value in record["codes"].items()}

    if scenario == "codes":
        source = CodeCacheShards(folder / "cache")
        builders = {"caption": lambda r, e: factory.caption(r["id"], r["text"], ImageSlot(codes=codes(r),
                                                                                          image_key=r["id"])),
                    "t2i": lambda r, e: factory.t2i(r["id"], r["text"], codes(r), e)}
    else:
        source = LlavaJsonShards(folder / "conversations.jsonl", records_per_shard=SHARD_SIZE, normalise=True)
        builders = {"conversation": lambda r, e: factory.conversation(r, [])}
    try:
        from unimm.data.streaming import StreamingMixture, StreamTask
    except ImportError:
        StreamingMixture = None
    if StreamingMixture is not None:
        tasks = [StreamTask(name, source, build, 1.0) for name, build in builders.items()]
        return iter(StreamingMixture(tasks, seed=0).configure(batch_size=batch_size)), "StreamingMixture"

    def in_order():
        while True:
            for shard in source.shards():
                for record in source.read(shard):
                    for build in builders.values():
                        try:
                            yield build(record, 0)
                        except SampleError:
                            pass
    return in_order(), "shards in order (no unimm.data.streaming in this checkout)"


def _factory(root: Path):
    """The sample factory and collator of the Qwen2.5 tokenizer with UniMM's tokens for `SPEC` (untimed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from unimm.data.collator import UniMMCollator
    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.llm.vocab import extend_tokenizer_and_model
    from unimm.testing import tiny_llm_config

    torch.set_num_threads(1)
    tokenizer = _text_tokenizer(root / "qwen2.5")
    config = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    layout = extend_tokenizer_and_model(tokenizer, AutoModelForCausalLM.from_config(config), SPEC)
    return SampleFactory(tokenizer, layout, SampleConfig(max_length=2048)), \
        UniMMCollator(pad_token_id=tokenizer.pad_token_id)


def measure(folder: Path, scenario: str, batch_size: int, num_samples: int) -> dict:
    """One start, timed from building the sources to the first collated batch, then `num_samples` more samples."""
    factory, collator = _factory(folder.parent)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) from here: the tokenizer set-up left out
    rss_before = _status_mib("VmRSS")
    start = time.perf_counter()
    stream, path = _pipeline(folder, scenario, factory, batch_size)
    batch = collator([next(stream) for _ in range(batch_size)])
    first = time.perf_counter()
    assert batch["input_ids"].shape[0] == batch_size
    for _ in range(num_samples // batch_size):
        collator([next(stream) for _ in range(batch_size)])
    end = time.perf_counter()
    return {"path": path, "first_batch_s": first - start, "samples_per_s": num_samples // batch_size * batch_size
            / (end - first), "rss_before_mib": rss_before, "peak_rss_mib": _status_mib("VmHWM")}


def throughput(folders: list[Path], scenario: str, batch_size: int, num_samples: int, rounds: int) -> dict:
    """Samples/s of every size's data path in one process, the sizes taking turns for `rounds` rounds (a
    shared machine's busy moments spread over all of them): {"wall" | "cpu": {folder: [samples/s per round]}},
    per second of wall-clock time and per second of this process's CPU time (which other jobs on the machine do
    not stretch; the data path is one thread and its files are in the page cache)."""
    factory, collator = _factory(folders[0].parent)
    out: dict[str, dict[str, list[float]]] = {kind: {str(f): [] for f in folders} for kind in ("wall", "cpu")}
    for _ in range(rounds):
        for folder in folders:
            stream, _ = _pipeline(folder, scenario, factory, batch_size)
            for _ in range(4 * batch_size):  # the first windows read and built
                next(stream)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(num_samples // batch_size):
                collator([next(stream) for _ in range(batch_size)])
            samples = num_samples // batch_size * batch_size
            out["wall"][str(folder)].append(samples / (time.perf_counter() - wall))
            out["cpu"][str(folder)].append(samples / (time.process_time() - cpu))
    return out


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({' '.join(args)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_measure(folder: Path, scenario: str, batch_size: int, num_samples: int) -> dict:
    return _run("--measure", str(folder), "--scenario", scenario, "--batch_size", str(batch_size), "--samples",
                str(num_samples))


def bytes_per_image(records: int = 64) -> dict:
    """Arrow bytes per record of a code-cache shard at DualToken-384's shape (2 groups of [729, 8], 16384 codes):
    the format-2 layout (int32) against the smallest type (int16), both written by `shard_table`."""
    import numpy as np

    from unimm.data.code_cache import shard_table

    rng = np.random.default_rng(0)
    spec = {name: {"num_codes": 16384, "depth": 8, "code_dim": 32} for name in ("pixel", "semantic")}
    codes = {name: rng.integers(0, 16384, size=(records, 729 * 8)) for name in spec}
    ids = [f"img{i:08d}" for i in range(records)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in (("int32 (format 2)", {n: {"num_codes": None} for n in spec}), ("int16", spec)):
            import pyarrow as pa

            path = Path(tmp) / "shard.arrow"
            table = shard_table(ids, None, codes, layout)
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out[name] = path.stat().st_size / records
    return out


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000, 1000000, 10000000])
    parser.add_argument("--scenarios", nargs="+", default=["codes", "conversations"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8000, help="samples drawn per size and round, for samples/s")
    parser.add_argument("--rounds", type=int, default=2, help="fresh-process starts per size (median reported)")
    parser.add_argument("--bytes", action="store_true", help="only the bytes per image at DualToken-384's shape")
    parser.add_argument("--tmp", default=None, help="folder for the generated data (default: the system's)")
    parser.add_argument("--data_dir", default=None, help="keep the generated data here (reused by the next run; "
                        "delete it yourself) instead of a temporary folder")
    parser.add_argument("--throughput_rounds", type=int, default=5, help="rounds of the samples/s process")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--throughput", type=Path, nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="codes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.scenario, args.batch_size, args.samples)))
        return
    if args.throughput:
        print(json.dumps(throughput(args.throughput, args.scenario, args.batch_size, args.samples, args.rounds)))
        return
    if args.bytes:
        sizes = bytes_per_image()
        for name, size in sizes.items():
            print(f"{name}: {size / 1000:.1f} KB per image, {size * 1e8 / 1e12:.2f} TB per 100M images")
        return

    with tempfile.TemporaryDirectory(prefix="unimm_data_scale_", dir=args.tmp) as tmp:
        tmp = Path(args.data_dir) if args.data_dir else Path(tmp)
        _text_tokenizer(tmp / "qwen2.5")
        folders = {}
        for size in args.sizes:
            folders[size] = folder = tmp / f"n{size}"
            start = time.perf_counter()
            if (folder / "cache" / "cache_info.json").is_file() and (folder / "conversations.jsonl").is_file():
                for index in folder.glob("conversations.jsonl.index.*"):  # the first start builds it again
                    index.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, size)
            disk = {name: sum(p.stat().st_size for p in (folder / name).rglob("*")) if (folder / name).is_dir()
                    else (folder / name).stat().st_size for name in ("cache", "conversations.jsonl")}
            print(f"# {size:,} records generated in {time.perf_counter() - start:.0f} s (cache "
                  f"{disk['cache'] / 2**20:.0f} MiB, conversations.jsonl {disk['conversations.jsonl'] / 2**20:.0f} "
                  f"MiB)", flush=True)
        runs: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.rounds):  # first batch and RSS: a fresh process per run
            for size in args.sizes:
                for scenario in args.scenarios:
                    starts = ["second start"] if scenario == "conversations" else ["start"]
                    if scenario == "conversations" and round_ == 0:
                        starts.insert(0, "first start (index built)")
                    for which in starts:
                        result = _run_measure(folders[size], scenario, args.batch_size, args.batch_size)
                        runs.setdefault((f"{scenario}, {which}", size), []).append(result)
                        print(json.dumps({"round": round_, "records": size, "scenario": f"{scenario}, {which}",
                                          **result}), flush=True)
        rates = {}
        for scenario in args.scenarios:  # samples/s: one process, the sizes taking turns
            rates[scenario] = _run("--throughput", *map(str, folders.values()), "--scenario", scenario,
                                   "--batch_size", str(args.batch_size), "--samples", str(args.samples),
                                   "--rounds", str(args.throughput_rounds))
            print(json.dumps({"scenario": scenario, "samples_per_s": rates[scenario]}), flush=True)
        rows = []
        for (scenario, size), results in runs.items():
            rate = rates[scenario.split(",")[0]]
            rows.append({"scenario": scenario, "records": size, "runs": len(results), "path": results[0]["path"],
                         "first_batch_s": float(np.median([r["first_batch_s"] for r in results])),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                         "growth_mib": max(r["peak_rss_mib"] - r["rss_before_mib"] for r in results),
                         "samples_per_s": float(np.median(rate["wall"][str(folders[size])])),
                         "samples_per_cpu_s": float(np.median(rate["cpu"][str(folders[size])]))})
        rows.sort(key=lambda r: (r["scenario"], r["records"]))
        print(f"\npath measured: {rows[0]['path']}\n")
        print(f"| scenario | records | first batch s (median of {args.rounds} starts) | peak RSS MiB (max) | data path "
              f"growth MiB | samples/s (median of {args.throughput_rounds}, one process) | samples per CPU-s |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['scenario']} | {row['records']:,} | {row['first_batch_s']:.2f} | "
                  f"{row['peak_rss_mib']:.0f} | {row['growth_mib']:.0f} | {row['samples_per_s']:.0f} | "
                  f"{row['samples_per_cpu_s']:.0f} |")
        smallest, largest = min(args.sizes), max(args.sizes)
        for scenario in sorted({row["scenario"] for row in rows}):
            low = next(r for r in rows if r["scenario"] == scenario and r["records"] == smallest)
            high = next(r for r in rows if r["scenario"] == scenario and r["records"] == largest)
            print(f"# {scenario}: {largest:,} against {smallest:,}: first batch {high['first_batch_s']:.2f} s, "
                  f"RSS x{high['peak_rss_mib'] / low['peak_rss_mib']:.2f}, samples/s "
                  f"x{high['samples_per_s'] / low['samples_per_s']:.2f} (per CPU-s "
                  f"x{high['samples_per_cpu_s'] / low['samples_per_cpu_s']:.2f})")


if __name__ == "__main__":
    main()
