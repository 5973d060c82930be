"""Genuine DeepSpeed engine checkpoints for the safe-resume tests, written by a one-process engine (gloo, CPU):
ZeRO stages 1, 2 and 3, each in float32 and bf16 (`<out>/zero<stage>_<dtype>/global_step1/`). Then the world-size
fault: the ZeRO-2 checkpoint's recorded data-parallel world size is set to 2 (as if two ranks had saved it) and the
engine loads it, so DeepSpeed raises its real `ZeRORuntimeException`; `<out>/world_size_error.json` records how a
program reports it (`unimm.cli.errors`).

    python tests/train/deepspeed_checkpoints.py OUT_DIR MASTER_PORT
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    out, port = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch

    from unimm.cli.errors import describe_user_error, is_user_error

    def engine(stage: int, bf16: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": bf16}}
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]

    for stage in (1, 2, 3):
        for bf16 in (False, True):
            ds = engine(stage, bf16)
            loss = ds(torch.ones(1, 4, dtype=torch.bfloat16 if bf16 else torch.float32)).float().sum()
            ds.backward(loss)
            ds.step()
            ds.save_checkpoint(f"{out}/zero{stage}_{'bf16' if bf16 else 'fp32'}", tag="global_step1")

    folder = f"{out}/world_size/global_step1"
    import shutil

    shutil.copytree(f"{out}/zero2_fp32", f"{out}/world_size")
    states = torch.load(f"{folder}/mp_rank_00_model_states.pt", weights_only=False)
    states["dp_world_size"] = 2
    torch.save(states, f"{folder}/mp_rank_00_model_states.pt")
    try:
        engine(2, False).load_checkpoint(f"{out}/world_size", tag="global_step1")
        result = {"raised": None}
    except Exception as err:  # noqa: BLE001 - the test asserts on what it was
        result = {"raised": type(err).__name__, "user_error": is_user_error(err), "line": describe_user_error(err)}
    with open(f"{out}/world_size_error.json", "w") as f:
        json.dump(result, f)
