#!/usr/bin/env bash
# The first-GPU measurements in one command (benchmarks/gpu_suite.py): pretraining tokens/s and MFU (VQRAE and
# DualToken layouts), the depth heads' share of the step, text-to-image image tokens/s per decode mode and batch,
# visual-tokenizer encode images/s. Prints one markdown table.
#   bash benchmarks/gpu_suite.sh                        # one CUDA GPU, paper shapes
#   bash benchmarks/gpu_suite.sh --device cpu --tiny    # toy shapes on CPU (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu_suite.py "$@"
