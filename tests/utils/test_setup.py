"""The set-up contract: CI runs exactly the README's test command, which installs into .venv by itself (the
install modes and the lock are tested in test_lock.py)."""

from pathlib import Path

import pytest

from unimm.utils.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "bash scripts/test.sh" in commands
    # nothing else runs that a user is not told to run
    assert all(c.startswith(("set ", "cd ")) or c == "bash scripts/test.sh" for c in commands), commands


def test_parse_config_yaml_and_overrides(tmp_path):
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        lr: float = field(default=1e-3, metadata={"help": "learning rate"})
        steps: int = field(default=10, metadata={"help": "steps"})

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nsteps: 3\n")
    (args,) = parse_config((Args,), [str(cfg), "--steps", "7"])
    assert args.lr == 0.5 and args.steps == 7
    cfg.write_text("bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        parse_config((Args,), [str(cfg)])


def test_distributed_helpers_are_noops_without_process_group():
    import torch

    from unimm.utils import distributed as d

    t = torch.ones(3)
    assert d.get_rank() == 0 and d.get_world_size() == 1
    assert torch.equal(d.all_reduce_sum(t), torch.ones(3))
    assert torch.equal(d.broadcast(t), torch.ones(3))


def test_attention_backend_falls_back_to_sdpa_on_cpu():
    import torch

    from unimm.utils.attention import select_attn_implementation

    assert select_attn_implementation(None, torch.bfloat16) in ("sdpa", "flash_attention_2")
    assert select_attn_implementation("eager") == "eager"
    with pytest.raises(ValueError):
        select_attn_implementation("bogus")


def test_resolved_config_writes_training_arguments(tmp_path):
    import yaml
    from transformers import TrainingArguments

    from unimm.utils.config import save_resolved_config

    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine", report_to=[])
    path = save_resolved_config(tmp_path, args)
    data = yaml.safe_load(path.read_text())
    assert data["lr_scheduler_type"] == "cosine" and data["output_dir"] == str(tmp_path)
