"""Launched by test_zero3.py as `deepspeed --num_gpus 2 zero3_train.py --llm DIR --out DIR` (2 CPU/gloo ranks).

Extends a tiny LLM *before* DeepSpeed wraps it, trains a few ZeRO-3 steps, then on rank 0 writes
`logits.pt` (eval logits computed by the engine) and the gathered weights via `save_pretrained`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.llm.conftest import DUAL_SPEC, HEAD_KWARGS, image_batch  # noqa: E402
from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model  # noqa: E402
from unimm.utils.hf_compat import release_deepspeed_shm_buffer_at_exit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    release_deepspeed_shm_buffer_at_exit()
    rank = dist.get_rank()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    model = UniMMForCausalLM.from_llm(args.llm, DUAL_SPEC, **HEAD_KWARGS)
    layout = extend_tokenizer_and_model(tokenizer, model, DUAL_SPEC)  # before deepspeed.initialize

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                              "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    prompts = ["a red circle", "a green square", "a blue triangle", "a yellow circle"]
    train = image_batch(tokenizer, layout, DUAL_SPEC, prompts[2 * rank : 2 * rank + 2], 4, seed=rank)
    losses = []
    engine.train()
    for _ in range(args.steps):
        loss = engine(**train).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    engine.eval()
    evaluation = image_batch(tokenizer, layout, DUAL_SPEC, prompts, 4, seed=99)
    with torch.no_grad():
        out = engine(**evaluation, return_logits=True)
    out_dir = Path(args.out)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(out_dir, state_dict=state)
            tokenizer.save_pretrained(out_dir)
    if rank == 0:
        torch.save({"logits": out.logits, "loss": out.loss, "train_losses": losses, "batch": evaluation},
                   out_dir / "logits.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
