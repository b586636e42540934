#!/usr/bin/env bash
# GPU validation and timing of the Triton kernels, as one prepared run. Installs nothing: it
# stages eplb_triton (with kernels/ as eplb_triton.kernels) in a temporary folder on PYTHONPATH.
#
# Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]
#   OUT_DIR defaults to $OUT (the device tool's result folder), else benchmarks/results/gpu-check.
#   Real loads: $EPLB_DATA, else ../shared/data/deepseek-v3-sglang, else .gpu-data/deepseek-v3-sglang
#   (an untracked copy that the device tool can carry, since ../shared does not travel).
# Writes OUT_DIR/results.json, OUT_DIR/summary.txt and OUT_DIR/pytest.txt.
#
# With the device tool (../shared does not travel; .gpu-data/ is git-ignored, never committed):
#   mkdir -p .gpu-data && cp -r ../shared/data/deepseek-v3-sglang .gpu-data/
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-data"], timeout_s=600)
# Budget: pytest <= 150 s, gpu_check.py <= 300 s (it saves results after every section), so one
# run fits a 10-minute call with room in a 15-minute lease for a second one.
# Before a lease: python benchmarks/gpu_check.py --smoke --out /tmp/smoke runs every section on
# the CPU interpreter at tiny shapes.
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
out=$(cd "$out" && pwd)
[ -n "$data" ] && data=$(cd "$data" && pwd) && export EPLB_DATA="$data"
# A staged copy, run from its own folder so the checkout's eplb_triton/ (without kernels/) cannot
# shadow it on sys.path.
stage=$(mktemp -d)
cp -r eplb_triton tests benchmarks pyproject.toml "$stage/"
cp -r kernels "$stage/eplb_triton/kernels"
cd "$stage"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/nvidia-smi.txt"

# The GPU-only tests (real shapes, CUDA-graph capture) and the fixed interpreter-sized ones, now
# compiled for real; the hypothesis sweeps are left out (each new shape is a new compilation).
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "not generated and not building_block" \
  tests/test_kernels.py tests/test_api.py tests/test_online.py tests/test_rounding.py 2>&1 | tail -n 30 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/gpu_check.py --out "$out" ${data:+--data "$data"}
check_rc=$?
echo "pytest rc=$tests_rc gpu_check rc=$check_rc"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
