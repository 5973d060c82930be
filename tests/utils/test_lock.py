"""The install contract: a fresh clone installs exactly the locked versions, and the lock covers everything.

`requirements/lock.txt` is a pip constraints file (written by scripts/refresh_lock.sh after a passing
`UNIMM_DEPS=latest` run); `scripts/_venv.sh` installs from it unless `UNIMM_DEPS=latest`."""

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
# What the suite imports, named for a reader: the closure check below covers these and everything they pull in.
IMPORTED = ["torch", "transformers", "accelerate", "deepspeed", "peft", "datasets", "tokenizers", "safetensors",
            "numpy", "pillow", "huggingface-hub", "sentencepiece", "pyarrow", "pyyaml", "tqdm", "protobuf",
            "packaging", "pytest", "pytest-timeout", "ruff", "scikit-image", "vector-quantize-pytorch"]


@pytest.fixture
def lock_file():
    if not LOCK.is_file():
        if os.environ.get("UNIMM_DEPS") == "latest":
            pytest.skip(f"no {LOCK.name} yet: scripts/refresh_lock.sh writes it after this latest run passes")
        pytest.fail(f"{LOCK} is missing: restore it from git, or write it with scripts/refresh_lock.sh")
    return LOCK


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"{LOCK}: not an exact pin: {line!r}"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Every distribution `root[extras]` needs in this environment (its requirements' markers evaluated here)."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted_extras = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted_extras) in seen:
            continue
        seen.add((key, wanted_extras))
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None:
                environments = [{"extra": e} for e in wanted_extras] or [{"extra": ""}]
                if not any(req.marker.evaluate(env) for env in environments):
                    continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen} - {canonicalize_name(root)}


def _dry_run(script: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNIMM_")}
    result = subprocess.run(["bash", script], cwd=ROOT, env={**clean, "UNIMM_DRY_RUN": "1", **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("script", ["scripts/test.sh", "scripts/quickstart.sh"])
def test_scripts_install_from_the_lock_by_default(script, lock_file):
    out = _dry_run(script)
    assert "venv: .venv\n" in out
    torch_line, package_line = [line for line in out.splitlines() if line.startswith("install: ")]
    assert torch_line.endswith(f"-c requirements/lock.txt torch=={_pins()['torch']}"), torch_line
    assert "-c requirements/lock.txt" in package_line and '-e .[dev]' in package_line, package_line
    assert "--upgrade" not in out


@pytest.mark.parametrize("script", ["scripts/test.sh", "scripts/quickstart.sh"])
def test_latest_mode_installs_the_newest_releases_apart(script):
    out = _dry_run(script, UNIMM_DEPS="latest")
    assert "venv: .venv-latest\n" in out
    torch_line, package_line = [line for line in out.splitlines() if line.startswith("install: ")]
    assert "lock.txt" not in out
    assert torch_line.endswith("torch==2.13.0"), "torch stays pinned to a release with a CPU build"
    assert "--upgrade --upgrade-strategy eager" in package_line


def test_unknown_mode_is_refused():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNIMM_")}
    result = subprocess.run(["bash", "scripts/test.sh"], cwd=ROOT, env={**clean, "UNIMM_DEPS": "newest"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "UNIMM_DEPS must be 'locked' or 'latest'" in result.stderr


@pytest.mark.skipif(os.environ.get("UNIMM_DEPS") == "latest",
                    reason="judges the locked environment: in latest mode the newest releases may need distributions "
                           "the lock does not pin yet (scripts/refresh_lock.sh adds them after this run passes)")
def test_lock_pins_every_distribution_the_suite_needs(lock_file):
    pins = _pins()
    missing = sorted(set(map(canonicalize_name, IMPORTED)) - set(pins))
    assert not missing, f"{LOCK} lacks {missing}"
    closure = _closure("unimm", ("dev",))
    assert set(map(canonicalize_name, IMPORTED)) <= closure | {"packaging"}
    unpinned = sorted(closure - set(pins))
    assert not unpinned, f"{LOCK} lacks pins for {unpinned}: rerun scripts/refresh_lock.sh"


@pytest.mark.skipif(os.environ.get("UNIMM_DEPS") != "locked",
                    reason="only meaningful inside `bash scripts/test.sh` in its default (locked) mode")
def test_locked_environment_is_exactly_the_lock(lock_file):
    wrong = {}
    for name in sorted(_closure("unimm", ("dev",))):
        installed = importlib.metadata.version(name).split("+", 1)[0]
        if installed != _pins().get(name):
            wrong[name] = (installed, _pins().get(name))
    assert not wrong, f"installed != locked (installed, locked): {wrong}"


def test_refresh_lock_freezes_the_environment_it_tested(tmp_path):
    """The freeze half of scripts/refresh_lock.sh, run on this environment (UNIMM_DRY_RUN skips the test run)."""
    import sys

    out = tmp_path / "lock.txt"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNIMM_")}
    env = {**clean, "UNIMM_DRY_RUN": "1", "UNIMM_VENV": sys.prefix, "UNIMM_LOCK_OUT": str(out)}
    result = subprocess.run(["bash", "scripts/refresh_lock.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    pins = dict(line.split("==", 1) for line in lines)
    assert pins["transformers"] == importlib.metadata.version("transformers")
    assert pins["torch"] == importlib.metadata.version("torch").split("+", 1)[0]  # no local build label
    assert "pip" not in pins and "unimm" not in pins and not any(" @ " in line for line in lines)
    assert set(map(canonicalize_name, pins)) >= _closure("unimm", ("dev",))
