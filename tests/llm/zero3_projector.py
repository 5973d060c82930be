"""One ZeRO-3 rank (gloo, CPU): `save_mm_projector` gathers a partitioned projector, `load_mm_projector` checks
shapes against the full (`ds_shape`) ones and writes into the partitions, and a vision tower loads whole while the
Trainer's ZeRO-3 config is active (plain `from_pretrained` partitions it). Run by test_projector.py in its own
process, since it initialises torch.distributed. Usage: zero3_projector.py OUT_DIR PORT"""

from __future__ import annotations

import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402

from unimm.llm.embedding import FeatureProjector  # noqa: E402
from unimm.llm.projector import ProjectorFileError, load_mm_projector, save_mm_projector  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
out = sys.argv[1]
torch.manual_seed(0)
reference = FeatureProjector(6, 8)
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    partitioned = FeatureProjector(6, 8)
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in partitioned.parameters()), "not partitioned"
save_mm_projector(reference, f"{out}/reference.bin")
load_mm_projector(partitioned, f"{out}/reference.bin")
save_mm_projector(partitioned, f"{out}/partitioned.bin")
saved, gathered = (torch.load(f"{out}/{name}.bin", weights_only=True) for name in ("reference", "partitioned"))
assert sorted(saved) == sorted(gathered) and all(torch.equal(saved[k], gathered[k]) for k in saved), "differs"
save_mm_projector(FeatureProjector(5, 8), f"{out}/other.bin")
try:
    load_mm_projector(partitioned, f"{out}/other.bin")
except ProjectorFileError as err:
    assert "expects [8, 6]" in str(err), err
else:
    raise AssertionError("a wrong-shape projector loaded into a partitioned one")

from transformers import CLIPVisionModel  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from unimm.llm.vision_tower import VisionTower  # noqa: E402
from unimm.testing import build_tiny_vision_tower  # noqa: E402

tower_path = build_tiny_vision_tower(f"{out}/clip", "clip")
hf_config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # alive
assert all(p.numel() == 0 for p in CLIPVisionModel.from_pretrained(tower_path).parameters()), "not partitioned"
tower = VisionTower.from_path(tower_path)
assert not any(hasattr(p, "ds_id") for p in tower.parameters()), "the vision tower was partitioned"
assert tower(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 32)
from transformers.integrations import is_deepspeed_zero3_enabled  # noqa: E402

assert is_deepspeed_zero3_enabled(), "the ZeRO-3 config was not restored"
del hf_config
deepspeed.comm.destroy_process_group()
print("ZERO3_PROJECTOR_OK")
