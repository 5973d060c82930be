#!/usr/bin/env bash
# Run the UniMM test suite from a clean clone: creates (or reuses) .venv, installs unimm[dev] from the lock
# (requirements/lock.txt; UNIMM_DEPS=latest for the newest releases, see scripts/_venv.sh), runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/llm -x`.
#
# Without arguments the suite has two parts: everything but the extras' tests in .venv, then the tests of the
# extras that fight the lock (EXTRAS_TESTS: UniMM Studio and its browser test, lmms-eval) in .venv-extras
# (unimm[dev,demo,eval], built by scripts/_venv.sh with UNIMM_EXTRAS=1), with Chromium installed through apt when
# it is missing and the user is root. `UNIMM_EXTRAS=1 bash scripts/test.sh tests/eval -x` runs arguments there.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS_TESTS=(tests/demo tests/eval)

install_chromium() {  # the browser test's Chromium and chromedriver (Debian's packages); it skips without them
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium and chromium-driver (apt) for the browser test ..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null || echo "apt could not install chromium: the browser test will skip" >&2
  fi
}

source scripts/_venv.sh
# Tiny test models gain nothing from intra-op threads, and the 2-rank DeepSpeed tests would oversubscribe the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "${UNIMM_EXTRAS:-0}" = 1 ]; then  # the extras environment was the one just prepared
  install_chromium
  exec python -m pytest "$@"
fi
if [ $# -gt 0 ]; then
  exec python -m pytest "$@"
fi

status=0
python -m pytest "${EXTRAS_TESTS[@]/#/--ignore=}" || status=$?
export UNIMM_EXTRAS=1
source scripts/_venv.sh
install_chromium
python -m pytest "${EXTRAS_TESTS[@]}" || status=$?
exit "$status"
