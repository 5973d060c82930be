"""Paper-sized runs of UniMM's programs on random weights at the real widths (issue 11), timed stage by stage.

    python benchmarks/paper_shapes.py --out runs/paper_shapes                     # every stage below
    python benchmarks/paper_shapes.py --out runs/paper_shapes --stages chat       # some (prepare's outputs kept)

Shapes kept from the papers: SigLIP so400m patch 14 at 384 px (1152 wide, 27 layers; 729 positions) in a
DualToken tokenizer with 16384-code pixel and semantic codebooks of depth 8; a Qwen2.5-0.5B-shaped LLM (hidden 896,
14 heads, 2 KV heads, MLP 4864, vocabulary 151936) with Qwen's real tokenizer (from the qwen-agent wheel) and only
`--llm_layers` decoder layers. Stages:

- prepare:     save the random encoder, the LLM + tokenizer, the DualToken tokenizer (what train_tokenizer saves)
               and a few scikit-image photos with captions (setup, timed for context);
- prepare_vqrae: a random SigLIP2 so400m (NaFlex, patch 16, 256 positions) and a random torchvision-format VGG16
               trunk for LPIPS (the real v0.1 heads come from the lpips wheel; setup);
- vqrae_stage1: scripts/train_tokenizer.py with configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml, 2 steps
               (batch 2: 16384 x 1536 SimVQ, symmetric 27-layer ViT decoder, LPIPS, evaluation and checkpoint);
- pretokenize: scripts/pretokenize.py over the photos (the code cache);
- model:       `from_llm` + vocabulary extension saved as a UniMM model (what pretrain saves; setup);
- chat:        scripts/chat.py, one question about a photo (the image encoded to 729 x (8 + 8) codes);
- generate:    scripts/generate_t2i.py, one full 729-position image with classifier-free guidance.

Each program runs in its own process under /usr/bin/time; its wall time and peak resident memory are printed as a
table and written to `<out>/paper_shapes.json`. Not here (yet): VQRAE stage 2 and DualToken training (trainable
so400m encoder), DeepSpeed pretraining and LoRA finetuning at these shapes, which need more memory than the shared
2-core development machine has (VQRAE stage 1 alone peaks at ~14 GB). The default test suite never runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "prepare_vqrae", "vqrae_stage1", "pretokenize", "model", "chat", "generate")
QUESTION = "What is in the image?"
PROMPT = "a cup of coffee on a saucer"


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Working directory (reused between runs).")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="Stages to run, in order.")
    parser.add_argument("--llm_layers", type=int, default=2, help="Decoder layers of the Qwen2.5-0.5B-shaped LLM.")
    parser.add_argument("--num_photos", type=int, default=4, help="scikit-image photos in the data set.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each program.")
    parser.add_argument("--assets", type=Path, default=Path.home() / ".cache" / "unimm-test-assets",
                        help="Cache of the wheels holding the real tokenizer.")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    """Random so400m encoder, Qwen2.5-0.5B-shaped LLM with the real tokenizer, DualToken tokenizer, photos."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from unimm.testing import QWEN_AGENT_WHEEL, build_qwen2_tokenizer, wheel_member
    from unimm.tokenizer import build_tokenizer

    out = args.out
    torch.manual_seed(0)
    siglip = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, patch_size=14, image_size=384)
    SiglipVisionModel(siglip).save_pretrained(out / "encoder")
    tokenizer = build_qwen2_tokenizer(wheel_member(*QWEN_AGENT_WHEEL, args.assets), out / "llm")
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=args.llm_layers,
                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                  max_position_embeddings=32768, tie_word_embeddings=True,
                                  bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "llm")
    visual = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=out / "encoder")
    visual.save_pretrained(out / "tokenizer")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    records = []
    for name, image in _photos(args.num_photos):
        image.save(data / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "text": f"a photo of {name.replace('_', ' ')}"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def prepare_vqrae(args: argparse.Namespace) -> None:
    """Random SigLIP2 so400m (NaFlex: no size of its own; the preset sets 256 px) and a random VGG16 trunk."""
    import torch
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from unimm.tokenizer.lpips import LPIPS

    torch.manual_seed(0)
    siglip2 = Siglip2VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, patch_size=16, num_patches=256)
    Siglip2VisionModel(siglip2).save_pretrained(args.out / "encoder_siglip2")
    trunk = {f"features.{k}": v for k, v in LPIPS().features.state_dict().items()}  # torchvision's key format
    torch.save(trunk, args.out / "vgg16_random.pth")


def _photos(count: int) -> list[tuple[str, Any]]:
    """Non-square scikit-image photos at their own size (the transform resizes and crops them to 384 px)."""
    from PIL import Image
    from skimage import data

    names = ("coffee", "rocket", "chelsea", "astronaut", "immunohistochemistry", "hubble_deep_field")[:count]
    return [(name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in names]


def model(args: argparse.Namespace) -> None:
    """`from_llm` with the visual tokenizer + vocabulary extension, saved like a pretraining run's model."""
    from transformers import AutoTokenizer

    from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
    from unimm.tokenizer import load_tokenizer

    visual = load_tokenizer(args.out / "tokenizer")
    unimm = UniMMForCausalLM.from_llm(args.out / "llm", visual)
    tokenizer = AutoTokenizer.from_pretrained(args.out / "llm")
    extend_tokenizer_and_model(tokenizer, unimm, visual.codebook_spec)
    unimm.save_pretrained(args.out / "unimm")
    tokenizer.save_pretrained(args.out / "unimm")


def _program(args: argparse.Namespace, stage: str) -> list[str]:
    out = args.out
    if stage == "vqrae_stage1":
        from unimm.testing import LPIPS_WHEEL, wheel_member

        return ["scripts/train_tokenizer.py", "configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml",
                "--encoder_path", str(out / "encoder_siglip2"), "--dataset", str(out / "data" / "captions.jsonl"),
                "--output_dir", str(out / "vqrae_stage1"), "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--num_workers", "0", "--lpips_vgg_path", str(out / "vgg16_random.pth"),
                "--lpips_lin_path", str(wheel_member(*LPIPS_WHEEL, args.assets)), "--eval_max_images", "4",
                "--eval_batch_size", "2", "--logging_steps", "1", "--warmup_steps", "1"]
    if stage == "pretokenize":
        return ["scripts/pretokenize.py", "--data", str(out / "data" / "captions.jsonl"), "--tokenizer_path",
                str(out / "tokenizer"), "--output_dir", str(out / "code_cache"), "--num_workers", "0",
                "--batch_size", "2"]
    if stage == "chat":
        return ["scripts/chat.py", "--model_path", str(out / "unimm"), "--visual_tokenizer_path",
                str(out / "tokenizer"),
                "--images", str(out / "data" / "coffee.png"), "--questions", QUESTION, "--max_new_tokens", "4",
                "--output_json", str(out / "answers.json")]
    if stage == "generate":
        return ["scripts/generate_t2i.py", "--model_path", str(out / "unimm"), "--visual_tokenizer_path",
                str(out / "tokenizer"), "--prompts", PROMPT, "--cfg_scale", "3.0", "--batch_size", "1",
                "--output_dir", str(out / "generated"), "--seed", "0"]
    raise ValueError(stage)


def run_stage(args: argparse.Namespace, stage: str) -> dict[str, float]:
    """One stage in its own process under /usr/bin/time: wall seconds and peak resident memory (MiB)."""
    if stage in ("prepare", "prepare_vqrae", "model"):
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--llm_layers",
                   str(args.llm_layers), "--num_photos", str(args.num_photos), "--assets", str(args.assets),
                   "--_inner", stage]
    else:
        command = [sys.executable, *_program(args, stage)]
    report = args.out / f".{stage}.time"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(report), *command], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    _, max_kib = report.read_text().split()[-2:]
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(int(max_kib) / 1024)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--_inner" in argv:  # a setup stage, run in its own process by run_stage
        index = argv.index("--_inner")
        stage = argv[index + 1]
        args = _parse_args(argv[:index] + argv[index + 2:])
        {"prepare": prepare, "prepare_vqrae": prepare_vqrae, "model": model}[stage](args)
        return {}
    args = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "paper_shapes.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for stage in args.stages:
        print(f"=== {stage}", flush=True)
        results[stage] = run_stage(args, stage)
        results_file.write_text(json.dumps(results, indent=2))
    print("| stage | wall (s) | peak RSS (MiB) |\n| --- | --- | --- |")
    for stage in STAGES:
        if stage in results:
            print(f"| {stage} | {results[stage]['wall_s']} | {results[stage]['peak_rss_mib']} |")
    return results


if __name__ == "__main__":
    main()
