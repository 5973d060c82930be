"""The streamed data path against the map-style one, on the same code cache (`unimm.data.streaming`).

The cache (vqrae-tiny's code shape [64, 1], captions of 1-4 English sentences, shards of 4096 records) is written
by `benchmarks/startup.py`'s generator in a temporary folder. For caption + text-to-image with Qwen2.5's tokenizer,
in one process, each path is timed from building the dataset to its first sample, then over `--samples` samples:
- map-style: `build_mixture` (every shard's checksum verified, the schedule drawn) and `dataset[i]` in the order of
  a random sampler;
- streamed: `build_mixture(streaming=True)` (the manifest only; a shard's checksum when first read) and the stream
  of one reader;
- streamed, resumed: `load_state_dict` of a state saved mid-window, to the first sample (the window is read again).

    OMP_NUM_THREADS=1 python benchmarks/streaming.py --sizes 10000 100000 --samples 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _factory(folder: Path):
    from startup import _text_tokenizer
    from transformers import AutoModelForCausalLM

    from unimm.data.tasks import SampleConfig, SampleFactory
    from unimm.llm.vocab import extend_tokenizer_and_model
    from unimm.testing import tiny_llm_config

    tokenizer = _text_tokenizer(folder / "qwen2.5")
    config = tiny_llm_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=1)
    spec = {"semantic": {"num_codes": 512, "depth": 1, "code_dim": 32}}
    layout = extend_tokenizer_and_model(tokenizer, AutoModelForCausalLM.from_config(config), spec)
    return SampleFactory(tokenizer, layout, SampleConfig(max_length=2048))


def measure(folder: Path, factory, samples: int) -> dict:
    import numpy as np

    from unimm.data.mixture import MixtureConfig, build_mixture

    results = {}
    start = time.perf_counter()
    dataset = build_mixture(MixtureConfig(code_cache=str(folder / "cache"), caption_weight=1.0, t2i_weight=1.0),
                            factory)
    order = np.random.default_rng(0).permutation(len(dataset))[:samples]
    dataset[int(order[0])]
    results["map_first_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for index in order[1:]:
        dataset[int(index)]
    results["map_samples_per_s"] = (samples - 1) / (time.perf_counter() - start)

    config = MixtureConfig(code_cache=str(folder / "cache"), caption_weight=1.0, t2i_weight=1.0, streaming=True)
    start = time.perf_counter()
    stream = build_mixture(config, factory).configure(batch_size=1)
    iterator = iter(stream)
    next(iterator)
    results["stream_first_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(samples - 1):
        next(iterator)
    results["stream_samples_per_s"] = (samples - 1) / (time.perf_counter() - start)
    for _ in range(500):  # into the middle of a shuffle window
        next(iterator)
    state = stream.state_dict()
    start = time.perf_counter()
    resumed = build_mixture(config, factory).configure(batch_size=1)
    resumed.load_state_dict(state)
    next(iter(resumed))
    results["resume_first_s"] = time.perf_counter() - start
    return results


def main() -> None:
    import torch
    from startup import generate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| records | map-style first sample (s) | streamed first sample (s) | resumed first sample (s) | "
          "map-style samples/s | streamed samples/s | streamed / map-style |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        factory = _factory(root)
        for size in args.sizes:
            folder = root / f"n{size}"
            folder.mkdir()
            generate(folder, size)
            r = measure(folder, factory, args.samples)
            print(f"| {size:,} | {r['map_first_s']:.2f} | {r['stream_first_s']:.2f} | {r['resume_first_s']:.2f} | "
                  f"{r['map_samples_per_s']:.0f} | {r['stream_samples_per_s']:.0f} | "
                  f"{r['stream_samples_per_s'] / r['map_samples_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
