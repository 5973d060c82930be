#!/usr/bin/env bash
# UniMM Studio (`unimm-demo`, unimm/cli/demo.py) from a clean clone: creates or reuses .venv-extras (scripts/_venv.sh
# with UNIMM_EXTRAS=1: unimm[dev,demo,eval] from the lock) and serves the page; arguments go to unimm-demo:
#   bash scripts/demo.sh --run_dir runs/quickstart     # then open http://127.0.0.1:7860
# Paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export UNIMM_EXTRAS=1
source scripts/_venv.sh
exec python scripts/demo.py "$@"
