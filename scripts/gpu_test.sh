#!/usr/bin/env bash
# On the GPU machine, from the project root with .gpu sent along (../shared/gpu/stage.sh): builds with CUDA,
# runs the backend op tests (CPU and CUDA-vs-CPU) and the GPU micro-benchmarks. Logs go to $OUT (or /tmp).
#   usage: bash scripts/gpu_test.sh [--no-bench] [gtest filter, default: every backend test]
set -uo pipefail
out=${OUT:-/tmp}; bench=1
[ "${1:-}" = "--no-bench" ] && { bench=0; shift; }
filter=${1:-*}
bash .gpu/build.sh > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
source .gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
( cd build-cuda && HEADROOM_TEST_VERBOSE=1 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1 )
rc=$?
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \] Cuda|^\[  FAILED  \]" "$out/tests.log" | head -40
grep -B2 -A10 "Failure" "$out/tests.log" | head -60
if [ $bench = 1 ]; then ./build-cuda/bench_cuda > "$out/bench.log" 2>&1; cat "$out/bench.log"; fi
exit $rc
