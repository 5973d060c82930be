# Sourced by scripts/test.sh and scripts/quickstart.sh: create or reuse a virtual environment and install
# unimm[dev] into it.
#
#   UNIMM_DEPS=locked (default)  .venv, installed from requirements/lock.txt: exactly the versions CI tested.
#   UNIMM_DEPS=latest            .venv-latest, the newest releases of every dependency (a compatibility check;
#                                scripts/refresh_lock.sh turns a passing run of it into the new lock).
#   UNIMM_VENV=DIR               another environment folder.
#   UNIMM_DRY_RUN=1              print the install commands instead of running them (tests use this).
#   UNIMM_EXTRAS=1               the environment of the extras that fight the lock, unimm[dev,demo,eval] (UniMM
#                                Studio and lmms-eval), apart: .venv-extras (.venv-latest-extras when latest;
#                                UNIMM_EXTRAS_VENV=DIR another folder). See "The extras environment" below.
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
# The extras environment: the lock, except that the pins of requirements/extras-overrides.txt replace the lock's
# pins of those packages (Gradio caps pillow below 13; lmms-eval 0.7.x imports `filelock._api`, gone in filelock 4)
# and protobuf is left free while resolving (lmms-eval's wandb wants protobuf < 7), then put back to the lock's
# release without dependencies (transformers' SentencePiece loading needs protobuf 7). lmms-eval pulls PyPI's
# torchvision, a CUDA build that breaks a CPU torch: it is removed where torch has no CUDA.
EXTRAS="dev"
POST_INSTALL=()
PIP=(python -m pip install --quiet)
if [ "${UNIMM_EXTRAS:-0}" = 1 ]; then
  EXTRAS="dev,demo,eval"
  # no byte-compiling at install (torch's alone took 59 of 76 s on 2 cores): modules compile when first imported
  PIP+=(--no-compile)
  VENV_DIR="${UNIMM_EXTRAS_VENV:-${VENV_DIR}-extras}"
  OVERRIDES=requirements/extras-overrides.txt
  PROTOBUF_PIN="$(grep -E '^protobuf==' "$LOCK_FILE" | head -n 1)"
  POST_INSTALL=("${PIP[@]}" --no-deps "${PROTOBUF_PIN:-protobuf}")
  [ "$UNIMM_DEPS" = latest ] && POST_INSTALL=("${PIP[@]}" --no-deps --upgrade protobuf)
fi
if [ "$UNIMM_DEPS" = locked ]; then
  if [ ! -f "$LOCK_FILE" ]; then
    echo "$LOCK_FILE is missing: restore it from git, or run with UNIMM_DEPS=latest" >&2; exit 2
  fi
  TORCH_PIN="$(grep -E '^torch==' "$LOCK_FILE" | head -n 1)"
  TORCH_INSTALL=("${PIP[@]}" -c "$LOCK_FILE" "$TORCH_PIN")
  PIP_INSTALL=("${PIP[@]}" -c "$LOCK_FILE" -e ".[$EXTRAS]")
  # What the environment was last installed from: a change of lock or pyproject reinstalls.
  WANTED="locked $(cat pyproject.toml "$LOCK_FILE" | cksum)"
  if [ "$EXTRAS" != dev ]; then
    CONSTRAINTS="$VENV_DIR/.constraints.txt"  # written below: the lock less the overridden pins and protobuf
    PIP_INSTALL=("${PIP[@]}" -c "$CONSTRAINTS" -e ".[$EXTRAS]")
    WANTED="locked extras $(cat pyproject.toml "$LOCK_FILE" "$OVERRIDES" | cksum)"
  fi
else
  TORCH_PIN="torch==${UNIMM_TORCH_VERSION:-2.13.0}"
  TORCH_INSTALL=("${PIP[@]}" "$TORCH_PIN")
  # the only constraint is torch's pin, so that upgrading everything else leaves torch where it is
  PIP_INSTALL=("${PIP[@]}" --upgrade --upgrade-strategy eager -c "$VENV_DIR/.torch-pin.txt" -e ".[$EXTRAS]")
  WANTED="latest $(date +%s)"  # never reused: every latest run asks PyPI for the newest releases again
fi

if [ "${UNIMM_DRY_RUN:-0}" = 1 ]; then
  echo "venv: $VENV_DIR"
  echo "install: ${TORCH_INSTALL[*]}"
  echo "install: ${PIP_INSTALL[*]}"
  if [ ${#POST_INSTALL[@]} -gt 0 ]; then echo "then: ${POST_INSTALL[*]}"; fi
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
  echo "Installing unimm[$EXTRAS] into $VENV_DIR ($UNIMM_DEPS dependencies) ..." >&2
  "${TORCH_INSTALL[@]}"
  echo "$TORCH_PIN" > "$VENV_DIR/.torch-pin.txt"
  if [ -n "${CONSTRAINTS:-}" ]; then
    overridden="$(grep -oE '^[A-Za-z0-9_.-]+' "$OVERRIDES" | paste -sd '|' -)"
    { grep -viE "^(${overridden}|protobuf)==" "$LOCK_FILE"; grep -vE '^#' "$OVERRIDES"; } > "$CONSTRAINTS"
  fi
  "${PIP_INSTALL[@]}"
  if [ ${#POST_INSTALL[@]} -gt 0 ]; then
    "${POST_INSTALL[@]}"
    if python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
        && python -m pip show --quiet torchvision >/dev/null 2>&1; then
      python -m pip uninstall --quiet --yes torchvision
    fi
  fi
  echo "$WANTED" > "$STAMP"
fi
export UNIMM_DEPS UNIMM_ENV_READY="$VENV_PATH"

export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
