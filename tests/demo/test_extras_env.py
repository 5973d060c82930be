"""The extras environment's install contract (scripts/_venv.sh with UNIMM_EXTRAS=1): `.venv-extras` holds
unimm[dev,demo,eval] installed from requirements/lock.txt, where the pins of requirements/extras-overrides.txt
replace the lock's, protobuf is the lock's release and torchvision (PyPI's CUDA build) is absent on CPU; the lock
pins every other distribution of that closure."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
OVERRIDES = ROOT / "requirements" / "extras-overrides.txt"
EXTRAS = ("dev", "demo", "eval")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"{path}: not an exact pin: {line!r}"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _installed_closure(root: str, extras: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(installed distributions `root[extras]` needs here, required ones that are not installed)."""
    seen: set[tuple[str, tuple]] = set()
    absent: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted) in seen or key in absent:
            continue
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            absent.add(key)
            continue
        seen.add((key, wanted))
        for spec in requirements:
            req = Requirement(spec)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen} - {canonicalize_name(root)}, absent


def test_extras_mode_installs_the_three_extras_apart_from_the_lock():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNIMM_")}
    result = subprocess.run(["bash", "scripts/test.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**clean, "UNIMM_DRY_RUN": "1", "UNIMM_EXTRAS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "venv: .venv-extras"
    assert lines[1].endswith(f"-c requirements/lock.txt torch=={_pins(LOCK)['torch']}")
    assert lines[2].endswith("--no-compile -c .venv-extras/.constraints.txt -e .[dev,demo,eval]")
    protobuf = _pins(LOCK)["protobuf"]
    assert lines[3] == f"then: python -m pip install --quiet --no-compile --no-deps protobuf=={protobuf}"
    # the overrides name packages the lock pins too (anything else belongs in the lock)
    assert set(_pins(OVERRIDES)) <= set(_pins(LOCK)) and "protobuf" not in _pins(OVERRIDES)


@pytest.mark.skipif(os.environ.get("UNIMM_DEPS") != "locked" or os.environ.get("UNIMM_EXTRAS") != "1",
                    reason="only meaningful inside `bash scripts/test.sh`'s extras environment (locked mode)")
def test_extras_environment_is_exactly_the_lock_with_its_overrides():
    import sys

    import torch

    lock, overrides = _pins(LOCK), _pins(OVERRIDES)
    constraints = _pins(Path(sys.prefix) / ".constraints.txt")
    assert constraints == {**{k: v for k, v in lock.items() if k not in overrides and k != "protobuf"}, **overrides}
    installed, absent = _installed_closure("unimm", EXTRAS)
    assert absent == ({"torchvision"} if torch.version.cuda is None else set())
    wanted = {**lock, **overrides}
    unpinned = sorted(installed - set(wanted))
    assert not unpinned, f"{LOCK} lacks pins for {unpinned} (the closure of unimm[demo,eval])"
    wrong = {name: (importlib.metadata.version(name).split("+", 1)[0], wanted[name]) for name in sorted(installed)
             if importlib.metadata.version(name).split("+", 1)[0] != wanted[name]}
    assert not wrong, f"installed != pinned (installed, pinned): {wrong}"
