"""The checkpoint completeness rule shared by the tokenizer and LLM trainers: only folders with a `COMPLETE`
marker count, auto-resume warns about newer incomplete ones by name, pruning keeps complete checkpoints, and
JSON-lines logs are cut back to the resumed step."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from unimm.train.checkpoint import (
    incomplete_checkpoints,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_complete,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    trim_jsonl_log,
)
from unimm.train.llm.trainer import find_resume_checkpoint


def _folders(root, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        (root / f"checkpoint-{step}").mkdir()
    for step in complete:
        mark_complete(root / f"checkpoint-{step}", step)


def test_latest_checkpoint_skips_incomplete_and_names_it(tmp_path, caplog):
    _folders(tmp_path, complete=[2, 4], incomplete=[6])
    (tmp_path / "checkpoint-notastep").mkdir()
    with caplog.at_level(logging.WARNING, logger="unimm.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert f"ignoring incomplete checkpoint {tmp_path / 'checkpoint-6'}" in caplog.text
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert incomplete_checkpoints(tmp_path) == [tmp_path / "checkpoint-6"]
    assert (tmp_path / "checkpoint-4" / "COMPLETE").read_text() == "4"


def test_only_incomplete_checkpoints_means_start_over(tmp_path, caplog):
    _folders(tmp_path, complete=[], incomplete=[2])
    with caplog.at_level(logging.WARNING, logger="unimm.train.checkpoint"):
        assert latest_checkpoint(tmp_path) is None
        assert resolve_resume("auto", tmp_path) is None
    assert "checkpoint-2" in caplog.text and "resuming from the start" in caplog.text
    assert latest_checkpoint(tmp_path / "missing") is None


def test_explicit_resume_must_be_complete(tmp_path):
    _folders(tmp_path, complete=[2], incomplete=[4])
    assert resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4 is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9 does not exist"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    # The LLM side applies the same rule to resume_from_checkpoint / auto_resume.
    assert find_resume_checkpoint(None, tmp_path, auto_resume=True) == str(tmp_path / "checkpoint-2")
    assert find_resume_checkpoint(None, tmp_path, auto_resume=False) is None
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4 is not a complete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path, auto_resume=True)


def test_prune_keeps_newest_complete_and_drops_stale_partials(tmp_path):
    _folders(tmp_path, complete=[2, 6, 8, 10], incomplete=[4, 12])
    prune_checkpoints(tmp_path, keep_last=2, protect=(tmp_path / "checkpoint-2",))
    names = sorted(p.name for p in tmp_path.iterdir())
    # checkpoint-2 is protected (best), 4 was a stale partial, 6 is beyond keep_last; 12 may still be in progress.
    assert names == ["checkpoint-10", "checkpoint-12", "checkpoint-2", "checkpoint-8"]
    prune_checkpoints(tmp_path, keep_last=None)
    assert (tmp_path / "checkpoint-8").is_dir()


def test_save_checkpoint_marks_complete_and_round_trips(tmp_path):
    layer = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path, 5, {"model": layer}, {"batches_consumed": 7}, keep_last=1)
    assert is_complete(path) and not (path / ".COMPLETE.tmp").exists()
    other = torch.nn.Linear(3, 2)
    state = load_checkpoint(path, {"model": other})
    assert state == {"step": 5, "batches_consumed": 7}
    torch.testing.assert_close(other.weight, layer.weight)
    # A save interrupted before its marker leaves the previous checkpoint the one to resume from.
    (tmp_path / "checkpoint-6").mkdir()
    torch.save(layer.state_dict(), tmp_path / "checkpoint-6" / "model.pt")
    assert latest_checkpoint(tmp_path) == path


def test_trim_jsonl_log_drops_replayed_steps_and_torn_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')
    assert trim_jsonl_log(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert trim_jsonl_log(log, 3) == 0
    assert trim_jsonl_log(tmp_path / "absent.jsonl", 3) == 0
    assert trim_jsonl_log(log, -1) == 3 and log.read_text() == ""
