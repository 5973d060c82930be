"""`scripts/_jobs.sh` (the quickstart's concurrent steps): every step runs with one thread, its output comes back in
the order awaited whatever order the steps end in, a failed step stops the script naming it (after the others'
output), and steps still running when the script exits are stopped."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "steps.sh"
    script.write_text(f"set -euo pipefail\nJOBS_LOG_DIR={tmp_path}\nsource scripts/_jobs.sh\n{body}\n")
    return subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_steps_run_at_once_with_one_thread_and_print_in_the_order_awaited(tmp_path):
    result = _run(tmp_path, """
late() { sleep 0.5; echo "late, threads $OMP_NUM_THREADS"; }
started=$(date +%s%N)
background first late
background second bash -c 'sleep 0.5; echo second'
background third echo third
await first second third
echo "took $(( ($(date +%s%N) - started) / 1000000 )) ms"
""")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["late, threads 1", "second", "third"]
    assert int(lines[3].split()[1]) < 950  # the two half-second steps overlapped


def test_a_failed_step_stops_the_script_naming_it_after_every_awaited_output(tmp_path):
    result = _run(tmp_path, """
lane() { echo "lane starts"; false; echo "lane goes on"; }
background fails bash -c 'echo "bad input"; exit 3'
background works echo fine
background lane lane
await fails works lane
echo "not reached"
""")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["bad input", "fine", "lane starts"]  # a lane stops at its first failure
    assert "steps.sh: failed: fails lane (output above; logs in" in result.stderr
    assert (tmp_path / "fails.log").read_text() == "bad input\n"


def test_steps_still_running_are_stopped_when_the_script_exits(tmp_path):
    program, in_function = tmp_path / "program.pid", tmp_path / "function.pid"
    result = _run(tmp_path, f"""
lane() {{ bash -c 'echo $$ > {in_function}; exec sleep 60'; echo "not reached"; }}
background long bash -c 'echo $$ > {program}; exec sleep 60'
background lane lane
while [ ! -s {program} ] || [ ! -s {in_function} ]; do sleep 0.05; done
echo "an error elsewhere" >&2
exit 2
""")
    assert result.returncode == 2
    for pid in (int(program.read_text()), int(in_function.read_text())):
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"step {pid} still runs after the script exited")
