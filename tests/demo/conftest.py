"""Fixtures of the demo tests: the entry-point toy (tiny DualToken on 16 px solid colours, tiny Qwen2) and a run
folder holding a real 4-step pretraining run on it (in process, on CPU), whose model the demo opens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _entry_conftest():
    """tests/entry/conftest.py, loaded from its file: `import tests.entry` would find the top-level `tests` package
    that latex2sympy2 and torch-fidelity install into the extras environment (a regular package wins over this
    repository's namespace folder)."""
    spec = importlib.util.spec_from_file_location("unimm_tests_entry_conftest",
                                                  Path(__file__).resolve().parents[1] / "entry" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _entry_conftest().toy  # the entry-point toy fixture, shared


@pytest.fixture(scope="session")
def demo_runs(toy, tmp_path_factory) -> Path:
    """`runs/pretrain`: trainer_state.json with text and visual losses, checkpoint-2 and checkpoint-4, the model."""
    from unimm.cli import pretrain

    runs = tmp_path_factory.mktemp("demo_runs")
    pretrain.main([
        "--llm_path", str(toy["llm"]), "--visual_tokenizer_path", str(toy["tokenizer"]), "--code_cache",
        str(toy["cache"]), "--depth_head_layers", "1", "--max_length", "64",
        "--num_samples", "32", "--output_dir", str(runs / "pretrain"), "--max_steps", "4", "--save_steps", "2",
        "--logging_steps", "1", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps",
        "0", "--report_to", "none", "--dataloader_num_workers", "0", "--seed", "7", "--use_cpu", "true",
    ])
    return runs
