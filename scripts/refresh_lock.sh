#!/usr/bin/env bash
# Refresh requirements/lock.txt to today's newest releases, after proving they pass the suite:
#   1. `UNIMM_DEPS=latest bash scripts/test.sh` installs the newest releases into .venv-latest and runs the tests;
#   2. only if that passes, the whole installed closure of .venv-latest is frozen into requirements/lock.txt.
# Extra arguments go to pytest. Review `git diff requirements/lock.txt`, then commit the lock with the run's tally.
# UNIMM_LOCK_OUT=FILE writes elsewhere (tests use it with UNIMM_DRY_RUN=1, which skips the install and the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export UNIMM_DEPS=latest
VENV_DIR="${UNIMM_VENV:-.venv-latest}"
bash scripts/test.sh "$@"
LOCK="${UNIMM_LOCK_OUT:-requirements/lock.txt}"
mkdir -p "$(dirname "$LOCK")"
{
  echo "# The exact versions the UniMM test suite passed with: a pip constraints file covering the whole installed"
  echo "# closure of unimm[dev]. scripts/test.sh and scripts/quickstart.sh install from it by default."
  echo "# Written by scripts/refresh_lock.sh after a passing UNIMM_DEPS=latest run on $(date -u +%Y-%m-%d)"
  echo "# ($("$VENV_DIR/bin/python" -c 'import platform; print(platform.python_implementation(), platform.python_version(), platform.machine())'))."
  # local version labels (torch's +cpu) name a build, not a release: the pin must also match the CUDA build
  # --all: setuptools is a runtime requirement too; pip itself is not part of the closure
  "$VENV_DIR/bin/python" -m pip freeze --all --exclude-editable | grep -vE '^(#|-e |pip==)' \
    | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > "$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "wrote $LOCK ($(grep -cvE '^#' "$LOCK") pins)"
