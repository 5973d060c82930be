#!/usr/bin/env bash
# Run the UniMM test suite from a clean clone: creates (or reuses) .venv, installs unimm[dev] from the lock
# (requirements/lock.txt; UNIMM_DEPS=latest for the newest releases, see scripts/_venv.sh), runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/llm -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
# Tiny test models gain nothing from intra-op threads, and the 2-rank DeepSpeed tests would oversubscribe the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest "$@"
