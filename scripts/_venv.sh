# Sourced by scripts/test.sh and scripts/quickstart.sh: create or reuse .venv and install unimm[dev] into it.
# torch is installed first, pinned to a CPU-capable release: an open range would otherwise resolve to a
# multi-GB CUDA build on machines that have no GPU.
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==${UNIMM_TORCH_VERSION:-2.13.0}"
fi
STAMP=.venv/.unimm-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  python -m pip install --quiet -e ".[dev]"
  touch "$STAMP"
fi

export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
