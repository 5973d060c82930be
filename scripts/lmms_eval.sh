#!/usr/bin/env bash
# lmms-eval with UniMM's `unimm` model (unimm/eval/lmms.py) from a clean clone: creates or reuses .venv-extras
# (scripts/_venv.sh with UNIMM_EXTRAS=1: unimm[dev,demo,eval] from the lock, its conflicts resolved there) and runs
# `python -m lmms_eval` with the arguments given. Paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export UNIMM_EXTRAS=1
hub_offline="${HF_HUB_OFFLINE:-0}" datasets_offline="${HF_DATASETS_OFFLINE:-0}"
source scripts/_venv.sh
# _venv.sh sets the tests' offline mode: keep the caller's (lmms-eval downloads its datasets unless told not to)
export HF_HUB_OFFLINE="$hub_offline" HF_DATASETS_OFFLINE="$datasets_offline"
exec python -m lmms_eval "$@"
