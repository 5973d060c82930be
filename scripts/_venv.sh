# Sourced by scripts/test.sh and scripts/quickstart.sh: create or reuse a virtual environment and install
# unimm[dev] into it.
#
#   UNIMM_DEPS=locked (default)  .venv, installed from requirements/lock.txt: exactly the versions CI tested.
#   UNIMM_DEPS=latest            .venv-latest, the newest releases of every dependency (a compatibility check;
#                                scripts/refresh_lock.sh turns a passing run of it into the new lock).
#   UNIMM_VENV=DIR               another environment folder.
#   UNIMM_DRY_RUN=1              print the install commands instead of running them (tests use this).
#
# torch is installed first, alone, pinned to a release that has a CPU build: an open range would otherwise
# resolve to a multi-GB CUDA build on machines that have no GPU. Locked mode takes its version from the lock;
# latest mode keeps UNIMM_TORCH_VERSION (the newest torch on PyPI is a CUDA build).
UNIMM_DEPS="${UNIMM_DEPS:-locked}"
LOCK_FILE=requirements/lock.txt
case "$UNIMM_DEPS" in
  locked) VENV_DIR="${UNIMM_VENV:-.venv}" ;;
  latest) VENV_DIR="${UNIMM_VENV:-.venv-latest}" ;;
  *) echo "UNIMM_DEPS must be 'locked' or 'latest', got '$UNIMM_DEPS'" >&2; exit 2 ;;
esac
if [ "$UNIMM_DEPS" = locked ]; then
  if [ ! -f "$LOCK_FILE" ]; then
    echo "$LOCK_FILE is missing: restore it from git, or run with UNIMM_DEPS=latest" >&2; exit 2
  fi
  TORCH_PIN="$(grep -E '^torch==' "$LOCK_FILE" | head -n 1)"
  TORCH_INSTALL=(python -m pip install --quiet -c "$LOCK_FILE" "$TORCH_PIN")
  PIP_INSTALL=(python -m pip install --quiet -c "$LOCK_FILE" -e ".[dev]")
  # What the environment was last installed from: a change of lock or pyproject reinstalls.
  WANTED="locked $(cat pyproject.toml "$LOCK_FILE" | cksum)"
else
  TORCH_PIN="torch==${UNIMM_TORCH_VERSION:-2.13.0}"
  TORCH_INSTALL=(python -m pip install --quiet "$TORCH_PIN")
  # the only constraint is torch's pin, so that upgrading everything else leaves torch where it is
  PIP_INSTALL=(python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$VENV_DIR/.torch-pin.txt"
               -e ".[dev]")
  WANTED="latest $(date +%s)"  # never reused: every latest run asks PyPI for the newest releases again
fi

if [ "${UNIMM_DRY_RUN:-0}" = 1 ]; then
  echo "venv: $VENV_DIR"
  echo "install: ${TORCH_INSTALL[*]}"
  echo "install: ${PIP_INSTALL[*]}"
  exit 0  # sourced: ends the calling script (test.sh, quickstart.sh) too
fi

PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV_DIR"
fi
# shellcheck disable=SC1091
source "$VENV_DIR/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
STAMP="$VENV_DIR/.unimm-installed"
VENV_PATH="$(cd "$VENV_DIR" && pwd)"
# A program started from an environment this script already prepared (the quickstart test inside test.sh) reuses it.
if [ "${UNIMM_ENV_READY:-}" = "$VENV_PATH" ] && [ -f "$STAMP" ]; then
  :
elif [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
  echo "Installing unimm[dev] into $VENV_DIR ($UNIMM_DEPS dependencies) ..." >&2
  "${TORCH_INSTALL[@]}"
  echo "$TORCH_PIN" > "$VENV_DIR/.torch-pin.txt"
  "${PIP_INSTALL[@]}"
  echo "$WANTED" > "$STAMP"
fi
export UNIMM_DEPS UNIMM_ENV_READY="$VENV_PATH"

export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
