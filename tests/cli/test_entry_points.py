"""Every program is an importable `unimm.cli` module with `make_parser()` and `main(argv)`, installed as a
`[project.scripts]` console command, and `scripts/<program>.py` is a shim that runs the same `main`."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _console_scripts() -> dict[str, str]:
    """`[project.scripts]` of pyproject.toml (read as text: tomllib needs Python 3.11, the package supports 3.10)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, flags=re.M))


SCRIPTS = _console_scripts()
EXPECTED = {"unimm-pretrain", "unimm-finetune", "unimm-pretokenize", "unimm-inspect-data", "unimm-merge-lora",
            "unimm-chat", "unimm-generate-t2i", "unimm-train-tokenizer", "unimm-eval-tokenizer"}


def test_every_program_has_a_console_command():
    assert EXPECTED <= set(SCRIPTS)
    for command, target in SCRIPTS.items():
        module, _, attribute = target.partition(":")
        assert attribute == "main" and module == "unimm.cli." + command.removeprefix("unimm-").replace("-", "_")


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_program_module_has_parser_and_main(command):
    module = importlib.import_module(SCRIPTS[command].partition(":")[0])
    assert callable(module.main)
    help_text = module.make_parser().format_help()
    assert "--help" in help_text and len(re.findall(r"--\w+", help_text)) > 1


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_script_shim_runs_the_same_main(command):
    module = SCRIPTS[command].partition(":")[0]
    shim = REPO / "scripts" / f"{module.rsplit('.', 1)[1]}.py"
    assert shim.is_file(), f"{shim} missing"
    text = shim.read_text()
    assert f"from {module} import main" in text and len([line for line in text.splitlines() if line.strip()]) <= 6


def test_installed_console_command_answers_help():
    executable = shutil.which("unimm-merge-lora") or str(Path(sys.executable).parent / "unimm-merge-lora")
    if not Path(executable).exists():
        pytest.skip("unimm is not installed with its console scripts in this environment (pip install -e .)")
    proc = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--adapter_path" in proc.stdout, proc.stderr[-2000:]
