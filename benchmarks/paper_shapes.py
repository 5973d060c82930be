"""Paper-sized runs of UniMM's programs on random weights at the real widths (issue 11), timed stage by stage.

    python benchmarks/paper_shapes.py --out runs/paper_shapes                     # every stage below
    python benchmarks/paper_shapes.py --out runs/paper_shapes --stages chat       # some (prepare's outputs kept)

Shapes kept from the papers: SigLIP so400m patch 14 at 384 px (1152 wide, 27 layers; 729 positions) in a
DualToken tokenizer with 16384-code pixel and semantic codebooks of depth 8; an LLM of Qwen2.5-0.5B's structure
(its public config.json: hidden 896, 14 heads, 2 KV heads, MLP 4864, RoPE theta 1e6, vocabulary 151936, tied
input and output embeddings, no BOS token) saved in bfloat16 like the released checkpoint, with Qwen's real
tokenizer (from the qwen-agent wheel) and only `--llm_layers` of its 24 decoder layers. The LLM stages run in bf16
(`--bf16 true` for training, `--dtype bfloat16` for chat and generation). Stages:

- prepare:     save the random encoder, the LLM + tokenizer, the DualToken tokenizer (what train_tokenizer saves)
               and a few scikit-image photos with captions (setup, timed for context);
- prepare_vqrae: a random SigLIP2 so400m (NaFlex, patch 16, 256 positions) and a random torchvision-format VGG16
               trunk for LPIPS (the real v0.1 heads come from the lpips wheel; setup);
- vqrae_stage1: scripts/train_tokenizer.py with configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml, 2 steps
               (batch 2: 16384 x 1536 SimVQ, symmetric 27-layer ViT decoder, LPIPS, evaluation and checkpoint);
- vqrae_stage2: the stage-2 recipe (configs/tokenizer/vqrae-siglip2-so400m-256-stage2.yaml) from stage 1's model,
               2 steps: the so400m encoder trains too, with self-distillation against its frozen stage-1 copy;
- dualtoken_train: configs/tokenizer/dualtoken-siglip-so400m-384.yaml, 2 steps, batch 2 (trainable so400m encoder,
               per-tap attention projections, two 16384-code depth-8 EMA codebooks, CNN decoder, LPIPS,
               activation checkpointing);
- pretokenize: scripts/pretokenize.py over the photos (the code cache), and over a LLaVA JSON of questions about
               them (`pretokenize_llava`, the conversation code cache);
- model:       `from_llm(..., dtype=bfloat16)` + vocabulary extension saved as a UniMM model (what pretrain saves
               with `--bf16 true`; setup);
- pretrain_zero2 / pretrain_zero3: scripts/pretrain.py under `deepspeed --num_gpus 2` (two gloo ranks), 2 steps of
               text-to-image + captioning at batch 1 per rank, the paper visual-module preset, bf16, ZeRO-2 /
               ZeRO-3 (two ranks of 520M trainable parameters);
- finetune_lora: scripts/finetune.py, LoRA, bf16, 2 steps on the questions plus text-to-image, one process;
- visual_memory: benchmarks/visual_loss.py --scope model on the saved model: one text-to-image training step
               (729 image positions, bf16) with the depth-head loss of issue 11 (gradients held from forward to
               backward) and today's, activation checkpointing off and on;
- chat:        scripts/chat.py, one question about a photo (the image encoded to 729 x (8 + 8) codes);
- generate:    scripts/generate_t2i.py, one full 729-position image with classifier-free guidance.

Each program runs in its own process; its wall time and peak resident memory (of all its processes together,
sampled every 0.2 s, so the two DeepSpeed ranks count together) are printed as a table and written to
`<out>/paper_shapes.json`. The default test suite never runs this.
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
STAGES = ("prepare", "prepare_vqrae", "vqrae_stage1", "vqrae_stage2", "dualtoken_train", "pretokenize",
          "pretokenize_llava", "model", "pretrain_zero2", "pretrain_zero3", "finetune_lora", "visual_memory", "chat",
          "generate")
# Qwen2.5-0.5B's public config.json (24 layers; `--llm_layers` keeps the first few); no BOS token.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                  vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", bos_token_id=None)
QUESTION = "What is in the image?"
PROMPT = "a cup of coffee on a saucer"


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Working directory (reused between runs).")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="Stages to run, in order.")
    parser.add_argument("--llm_layers", type=int, default=2, help="Decoder layers of the Qwen2.5-0.5B-structured LLM "
                        "(of its 24).")
    parser.add_argument("--num_photos", type=int, default=4, help="scikit-image photos in the data set.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each program.")
    parser.add_argument("--assets", type=Path, default=Path.home() / ".cache" / "unimm-test-assets",
                        help="Cache of the wheels holding the real tokenizer.")
    parser.add_argument("--master_port", type=int, default=29680, help="First port of the DeepSpeed stages.")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    """Random so400m encoder, Qwen2.5-0.5B-structured bf16 LLM with the real tokenizer, DualToken tokenizer, photos."""
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
    config = AutoConfig.for_model("qwen2", **QWEN25_05B, num_hidden_layers=args.llm_layers,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if llm.get_input_embeddings().weight is not llm.get_output_embeddings().weight:
        raise RuntimeError("the Qwen2.5-0.5B structure ties the input and output embeddings")
    llm.save_pretrained(out / "llm")
    visual = build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=out / "encoder")
    visual.save_pretrained(out / "tokenizer")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    records = []
    for name, image in _photos(args.num_photos):
        image.save(data / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "text": f"a photo of {name.replace('_', ' ')}"})
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    conversations = [{"id": f"{r['id']}-qa", "image": r["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": r["text"]}]} for r in records]
    (data / "llava.json").write_text(json.dumps(conversations, indent=1))


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
    """`from_llm` with the visual tokenizer + vocabulary extension, saved like a bf16 pretraining run's model."""
    import torch
    from transformers import AutoTokenizer

    from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
    from unimm.tokenizer import load_tokenizer

    visual = load_tokenizer(args.out / "tokenizer")
    unimm = UniMMForCausalLM.from_llm(args.out / "llm", visual, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.out / "llm")
    extend_tokenizer_and_model(tokenizer, unimm, visual.codebook_spec)
    unimm.save_pretrained(args.out / "unimm")
    tokenizer.save_pretrained(args.out / "unimm")


def _tokenizer_run(args: argparse.Namespace, config: str, output: str, *extra: str) -> list[str]:
    from unimm.testing import LPIPS_WHEEL, wheel_member

    return ["scripts/train_tokenizer.py", config, "--dataset", str(args.out / "data" / "captions.jsonl"),
            "--output_dir", str(args.out / output), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--num_workers", "0", "--lpips_vgg_path", str(args.out / "vgg16_random.pth"),
            "--lpips_lin_path", str(wheel_member(*LPIPS_WHEEL, args.assets)), "--eval_max_images", "4",
            "--eval_batch_size", "2", "--logging_steps", "1", "--warmup_steps", "1", *extra]


# The LLM training stages: batch 1 per rank, 2 steps, no checkpoint before the end, bf16 (float32 ZeRO-3 ranks need
# ~10.6 GB each, RESULTS.md).
_LLM_TRAINING = ("--max_steps", "2", "--per_device_train_batch_size", "1", "--logging_steps", "1",
                 "--save_steps", "100000", "--learning_rate", "1e-4", "--warmup_steps", "0", "--bf16", "true",
                 "--dataloader_num_workers", "0", "--report_to", "none", "--max_length", "1024")


def _program(args: argparse.Namespace, stage: str) -> list[str]:
    out = args.out
    if stage == "vqrae_stage1":
        return _tokenizer_run(args, "configs/tokenizer/vqrae-siglip2-so400m-256-stage1.yaml", "vqrae_stage1",
                              "--encoder_path", str(out / "encoder_siglip2"))
    if stage == "vqrae_stage2":
        return _tokenizer_run(args, "configs/tokenizer/vqrae-siglip2-so400m-256-stage2.yaml", "vqrae_stage2",
                              "--model_path", str(out / "vqrae_stage1" / "model"))
    if stage == "dualtoken_train":
        # Activation checkpointing of the encoder and decoder layers: without it the run needs more than the
        # 2-core machine's 23.5 GB (killed at 23.9 GB before its first step).
        return _tokenizer_run(args, "configs/tokenizer/dualtoken-siglip-so400m-384.yaml", "dualtoken_train",
                              "--encoder_path", str(out / "encoder"), "--gradient_checkpointing", "true")
    if stage in ("pretokenize", "pretokenize_llava"):
        llava = stage == "pretokenize_llava"
        data = ["--data", str(out / "data" / "llava.json"), "--data_format", "llava"] if llava else [
            "--data", str(out / "data" / "captions.jsonl")]
        return ["scripts/pretokenize.py", *data, "--tokenizer_path", str(out / "tokenizer"), "--output_dir",
                str(out / ("code_cache_llava" if llava else "code_cache")), "--num_workers", "0", "--batch_size", "2"]
    if stage in ("pretrain_zero2", "pretrain_zero3"):
        zero = stage[-5:]
        port = args.master_port + (0 if zero == "zero2" else 1)
        return ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),  # the `deepspeed` command
                "scripts/pretrain.py", "--deepspeed", f"configs/deepspeed/{zero}.json", "--llm_path",
                str(out / "llm"), "--visual_tokenizer_path", str(out / "tokenizer"), "--code_cache",
                str(out / "code_cache"), "--output_dir", str(out / stage), "--model_preset", "paper",
                "--t2i_weight", "1", "--caption_weight", "1", "--train_llm", "true", *_LLM_TRAINING]
    if stage == "finetune_lora":
        return ["scripts/finetune.py", "--model_path", str(out / "unimm"), "--visual_tokenizer_path",
                str(out / "tokenizer"), "--conversation_json", str(out / "data" / "llava.json"),
                "--conversation_code_cache", str(out / "code_cache_llava"), "--code_cache", str(out / "code_cache"),
                "--conversation_weight", "1", "--t2i_weight", "1", "--use_lora", "true", "--output_dir",
                str(out / stage), *_LLM_TRAINING]
    if stage == "visual_memory":
        return ["benchmarks/visual_loss.py", "--scope", "model", "--model_path", str(out / "unimm"), "--batch", "1",
                "--dtype", "bfloat16", "--repeats", "2", "--threads", str(args.threads)]
    if stage == "chat":
        return ["scripts/chat.py", "--model_path", str(out / "unimm"), "--visual_tokenizer_path",
                str(out / "tokenizer"),
                "--images", str(out / "data" / "coffee.png"), "--questions", QUESTION, "--max_new_tokens", "4",
                "--output_json", str(out / "answers.json"), "--dtype", "bfloat16"]
    if stage == "generate":
        return ["scripts/generate_t2i.py", "--model_path", str(out / "unimm"), "--visual_tokenizer_path",
                str(out / "tokenizer"), "--prompts", PROMPT, "--cfg_scale", "3.0", "--batch_size", "1",
                "--output_dir", str(out / "generated"), "--seed", "0", "--dtype", "bfloat16"]
    raise ValueError(stage)


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_stage(args: argparse.Namespace, stage: str) -> dict[str, float]:
    """One stage in its own process (group): wall seconds and the peak of its processes' summed resident memory."""
    if stage in ("prepare", "prepare_vqrae", "model"):
        command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--llm_layers",
                   str(args.llm_layers), "--num_photos", str(args.num_photos), "--assets", str(args.assets),
                   "--_inner", stage]
    else:
        command = [sys.executable, *_program(args, stage)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    if stage.startswith("pretrain_"):
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // 2))  # two ranks share the cores
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_rss_bytes(process.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20)}


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
