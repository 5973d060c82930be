#!/usr/bin/env bash
# Run the UniMM test suite from a clean clone: creates (or reuses) .venv, installs unimm[dev], runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/llm -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m pytest "$@"
