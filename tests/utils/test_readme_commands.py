"""README commands stay true: every program, recipe file and flag a README example uses exists.

The examples' behaviour itself is exercised by the entry-point tests (tests/entry) and the quickstart test, which
drive the same programs through the same flags on tiny models; this test catches a README that drifts from them.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip() if not line.strip().startswith("python -m") else line.strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    for i, tok in enumerate(tokens):
        if tok.startswith("scripts/") and tok.endswith(".py"):
            return tok, tokens[i + 1:]
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("unimm."):
            return tokens[i + 1], tokens[i + 2:]
    return None


PROGRAMS: dict[str, list[list[str]]] = {}
for _tokens in _readme_commands():
    _found = _program(_tokens)
    if _found is not None:
        PROGRAMS.setdefault(_found[0], []).append(_found[1])


def test_readme_runs_the_two_setup_commands():
    commands = [" ".join(c) for c in _readme_commands()]
    assert "bash scripts/quickstart.sh" in commands and "bash scripts/test.sh" in commands
    assert (ROOT / "scripts" / "quickstart.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()


def _help_text(program: str, monkeypatch) -> str:
    out = io.StringIO()
    if program.endswith(".py"):
        monkeypatch.setattr(sys, "argv", [program, "--help"])
        runner = lambda: runpy.run_path(str(ROOT / program), run_name="__main__")  # noqa: E731
    else:
        monkeypatch.setattr(sys, "argv", [program, "--help"])
        runner = lambda: runpy.run_module(program, run_name="__main__", alter_sys=True)  # noqa: E731
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        runner()
    assert exit_info.value.code in (0, None), f"{program} --help failed"
    return out.getvalue()


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_readme_flags_and_files_exist(program, monkeypatch):
    if program.endswith(".py"):
        assert (ROOT / program).is_file(), f"README names {program}, which does not exist"
    help_text = _help_text(program, monkeypatch)
    for args in PROGRAMS[program]:
        for arg in args:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"{re.escape(flag)}\b", help_text), f"README passes {flag} to {program}"
            elif arg.startswith("configs/"):
                assert (ROOT / arg).is_file(), f"README names recipe {arg}, which does not exist"
