"""What verifying a code cache costs when it is opened, against pretokenizing the same data (issue: < 10%).

1. Quickstart-sized cache: the quickstart's DualToken architecture (random weights: speed does not depend on
   them) over 2048 shapes images at 32 px, through `run_pretokenize` (the program path: read records, hash the
   tokenizer weights, encode, write shards with checksums). Then `load_code_cache` with and without shard
   verification, and the tokenizer weights hash on its own.
2. A ~1 GiB cache of paper-shaped codes (DualToken at 384 px: 729 positions x 8 depths x 2 groups, int32),
   written through the same shard writer with random codes, verified warm (pages cached, as right after
   pretokenize) and cold (the shards' pages evicted with posix_fadvise). Pretokenizing the same images is
   bounded from below by the bare SigLIP-so400m encoder forward at 384 px (random weights), measured on a
   small batch and scaled to the cache's image count; the real pretokenize also decodes images and quantises.

    OMP_NUM_THREADS=2 python benchmarks/cache_checksum.py [--images 2048] [--gib 1.0] [--encoder_batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def quickstart_cache(root: Path, num_images: int) -> dict[str, float]:
    import yaml

    from unimm.data.code_cache import load_code_cache, tokenizer_weights_hash
    from unimm.data.pretokenize import PretokenizeConfig, run_pretokenize
    from unimm.data.toy.shapes import ShapesDataset, write_image_text_jsonl
    from unimm.tokenizer import build_tokenizer

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs/quickstart/tokenizer_dualtoken.yaml").read_text())
    tokenizer = build_tokenizer(recipe["preset"], **recipe["model_overrides"])
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "data").mkdir()
    jsonl = write_image_text_jsonl(ShapesDataset(num_images, seed=0), root / "data")
    config = PretokenizeConfig(data=str(jsonl), visual_tokenizer_path=str(root / "tokenizer"),
                               output_dir=str(root / "cache"), num_workers=0)
    start = time.perf_counter()
    run_pretokenize(config, show_progress=False)
    pretokenize_s = time.perf_counter() - start
    verified = _timed(lambda: load_code_cache(root / "cache", tokenizer))
    unverified = _timed(lambda: load_code_cache(root / "cache", tokenizer, verify=False))
    weights_hash = _timed(lambda: tokenizer_weights_hash(tokenizer))
    shard_bytes = sum(p.stat().st_size for p in (root / "cache").glob("shard-*.arrow"))
    return {"images": num_images, "shard_mib": shard_bytes / 2**20, "pretokenize_s": pretokenize_s,
            "open_verified_s": verified, "open_unverified_s": unverified, "verify_s": verified - unverified,
            "weights_hash_s": weights_hash,
            "tokenizer_params_m": sum(p.numel() for p in tokenizer.parameters()) / 1e6}


class _CodeShape:
    """Stand-in for a paper-size DualToken at 384 px: what finalize_code_cache reads from a tokenizer."""

    image_size = 384
    codebook_spec = {"pixel": {"num_codes": 16384, "depth": 8, "code_dim": 32},
                     "semantic": {"num_codes": 16384, "depth": 8, "code_dim": 32}}

    def config_hash(self) -> str:
        return "paper-dualtoken-384"


def large_cache(root: Path, gib: float, shard_size: int = 1024) -> dict[str, float]:
    from unimm.data.code_cache import (
        CACHE_FORMAT_VERSION,
        STATE_FILE,
        _write_arrow_atomic,
        finalize_code_cache,
        shard_name,
        verify_code_cache,
        write_json_atomic,
    )

    positions, depth = 729, 8
    row_bytes = 2 * positions * depth * 4
    num_rows = int(gib * 2**30 // row_bytes)
    num_shards = -(-num_rows // shard_size)
    out = root / "large"
    out.mkdir()
    write_json_atomic(out / STATE_FILE, {"format_version": CACHE_FORMAT_VERSION, "num_records": num_rows,
                                          "shard_size": shard_size, "source": "synthetic",
                                          "tokenizer_config_hash": "paper-dualtoken-384",
                                          "tokenizer_weights_hash": "synthetic"})
    rng = np.random.default_rng(0)
    write_s = 0.0
    for shard in range(num_shards):
        start_row, stop_row = shard * shard_size, min(num_rows, (shard + 1) * shard_size)
        rows = stop_row - start_row
        columns = {"id": pa.array([f"img{i:08d}" for i in range(start_row, stop_row)])}
        for group in ("pixel", "semantic"):
            flat = rng.integers(0, 16384, (rows, positions * depth), dtype=np.int32)
            offsets = np.arange(rows + 1, dtype=np.int32) * flat.shape[1]
            columns[f"codes_{group}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.reshape(-1)))
        start = time.perf_counter()
        checksum = _write_arrow_atomic(out / f"{shard_name(shard)}.arrow", pa.table(columns))
        write_s += time.perf_counter() - start
        write_json_atomic(out / f"{shard_name(shard)}.json", {
            "shard": shard, "start": start_row, "stop": stop_row, "num_records": rows, "num_written": rows,
            "skipped": [], "shapes": {"pixel": [positions, depth], "semantic": [positions, depth]},
            "checksum": checksum})
    finalize_code_cache(out, _CodeShape())
    shards = sorted(out.glob("shard-*.arrow"))
    warm = _timed(lambda: verify_code_cache(out), repeat=2)
    cold = []
    for _ in range(2):
        _evict(shards)
        start = time.perf_counter()
        verify_code_cache(out)
        cold.append(time.perf_counter() - start)
    return {"rows": num_rows, "shards": num_shards, "gib": sum(p.stat().st_size for p in shards) / 2**30,
            "write_with_checksum_s": write_s, "verify_warm_s": warm, "verify_cold_s": min(cold)}


def encoder_seconds_per_image(batch: int) -> float:
    """Bare SigLIP-so400m/14 vision tower forward at 384 px (random weights), seconds per image."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14)
    model = SiglipVisionModel(config).eval()
    pixels = torch.randn(batch, 3, 384, 384)
    with torch.no_grad():
        model(pixel_values=pixels)  # warm-up
        seconds = _timed(lambda: model(pixel_values=pixels), repeat=2)
    return seconds / batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048, help="Shapes images of the quickstart-sized cache.")
    parser.add_argument("--gib", type=float, default=1.0, help="Size of the large cache.")
    parser.add_argument("--encoder_batch", type=int, default=2, help="Images per so400m forward (0 = skip).")
    args = parser.parse_args()
    results: dict[str, dict] = {"threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("UNIMM_BENCH_DIR")) as tmp:
        root = Path(tmp)
        quick = quickstart_cache(root, args.images)
        quick["verify_fraction_of_pretokenize"] = quick["verify_s"] / quick["pretokenize_s"]
        results["quickstart"] = quick
        print(json.dumps(results, indent=2), flush=True)
        large = large_cache(root, args.gib)
        results["large"] = large
        print(json.dumps(large, indent=2), flush=True)
    if args.encoder_batch > 0:
        per_image = encoder_seconds_per_image(args.encoder_batch)
        large["so400m_encoder_s_per_image"] = per_image
        large["pretokenize_lower_bound_s"] = per_image * large["rows"]
        large["verify_cold_fraction_of_pretokenize"] = large["verify_cold_s"] / large["pretokenize_lower_bound_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
