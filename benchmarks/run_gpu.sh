#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): install, run every test (GPU tier included) and
# every benchmark, and leave the logs and the report under $OUT (or ./gpu-out).
# Usage from the device tool, in the repo root:  bash benchmarks/run_gpu.sh
# The device image has torch, triton, ninja, pytest and pytest-benchmark already: nothing is fetched.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -m sdae_fast.cli info
} 2>&1 | tee "$OUT/info.txt"
# Tests: the full suite compiles the Triton kernels for the GPU (no interpreter there).
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x --timeout=120 tests 2>&1 | tee "$OUT/tests.log" | tail -25
# Benchmarks: report (markdown + JSON with raw timings) into benchmarks/results and $OUT.
timeout ${BENCH_TIMEOUT:-300} python3 -m sdae_fast.cli bench --out benchmarks/results ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | tail -60
cp benchmarks/results/*.md benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
