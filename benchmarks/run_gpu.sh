#!/usr/bin/env bash
# One call on a lent GPU machine (device tool), at most ~8 minutes in all: install, the GPU test
# tier, the benchmark report and an end-to-end pretraining step. Every step runs under `timeout`
# (SIGTERM, then SIGKILL 10 s later), so nothing can hang; a failed step does not stop the others.
# Logs, the report and steps.txt (exit status and seconds per step) go to $OUT (default ./gpu-out);
# the report also to benchmarks/results/.
# Usage from the device tool, in the repo root:  bash benchmarks/run_gpu.sh
# The device image has torch, triton, ninja, pytest and pytest-benchmark: nothing is fetched.
# The static sm_90 tier (tests/test_sm90_static.py) runs in CI without a GPU and is skipped here.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" benchmarks/results
export PYTHONUNBUFFERED=1
: >"$OUT/steps.txt"

step() {  # step NAME SECONDS LOG COMMAND...
  local name=$1 limit=$2 log=$3 start=$SECONDS rc
  shift 3
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  tail -25 "$OUT/$log"
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
}

step install 45 install.log python3 -m pip install -q --no-deps --no-build-isolation -e .
step info 20 info.txt bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
  --format=csv; python3 -m sdae_fast.cli info"
# GPU tier first (bf16, long rows, int32-overflow shapes), then the rest on the GPU if time is left.
step tests-gpu ${GPU_TEST_TIMEOUT:-170} tests-gpu.log python3 -m pytest -q -m gpu -p no:cacheprovider \
  --ignore=tests/test_sm90_static.py tests
step tests-rest ${TEST_TIMEOUT:-45} tests-rest.log python3 -m pytest -q -x -m "not gpu and not slow" \
  -p no:cacheprovider --ignore=tests/test_sm90_static.py tests
step bench ${BENCH_TIMEOUT:-140} bench.log python3 -m sdae_fast.cli bench --out benchmarks/results ${BENCH_ARGS:-}
step end-to-end ${E2E_TIMEOUT:-40} end_to_end.log python3 -m sdae_fast.cli pretrain --method mixedae --steps 20 \
  --batch-size 64 --device cuda --out "$OUT/pretrain" --ckpt-every 0 --no-knn --no-export --log-every 5
cp benchmarks/results/*.md benchmarks/results/*.json "$OUT"/ 2>/dev/null || true
cat "$OUT/steps.txt"
