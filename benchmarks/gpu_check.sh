#!/usr/bin/env bash
# GPU validation and timing of the Triton kernels, as one prepared run. Installs nothing: it
# stages eplb_triton (with kernels/ as eplb_triton.kernels) in a temporary folder on PYTHONPATH.
#
# Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]
#   OUT_DIR defaults to $OUT (the device tool's result folder), else benchmarks/results/gpu-check.
#   Real loads: $EPLB_DATA, else ../shared/data/deepseek-v3-sglang, else .gpu-data/deepseek-v3-sglang
#   (an untracked copy that the device tool can carry, since ../shared does not travel).
# Writes OUT_DIR/results.json, OUT_DIR/summary.txt and OUT_DIR/pytest.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu-check}}
mkdir -p "$out"
data=${EPLB_DATA:-}
if [ -z "$data" ]; then
  for d in ../shared/data/deepseek-v3-sglang .gpu-data/deepseek-v3-sglang; do
    if [ -d "$d" ]; then data=$d; break; fi
  done
fi
stage=$(mktemp -d)
cp -r eplb_triton "$stage/eplb_triton"
cp -r kernels "$stage/eplb_triton/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/nvidia-smi.txt"

# The GPU-only tests (real shapes, CUDA-graph capture) and the interpreter-sized ones, compiled for real.
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_api.py tests/test_online.py 2>&1 | tail -n 30 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}

timeout 420 python3 benchmarks/gpu_check.py --out "$out" ${data:+--data "$data"}
check_rc=$?
echo "pytest rc=$tests_rc gpu_check rc=$check_rc"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
