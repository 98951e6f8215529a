#!/usr/bin/env bash
# On the GPU machine (like gpu_test.sh): build, the matmul op tests, then the matmul benchmark rows with the
# tensor-core skinny GEMM (default) and a baseline pass with it off (HEADROOM_CUDA_SKINNY_MAX=0: GEMV / cuBLAS).
#   usage: bash scripts/gpu_gemm.sh [gtest filter] [bench args for the main pass] [bench args for the baseline]
set -uo pipefail
out=${OUT:-/tmp}
filter=${1:-CudaBackendOps.Matmul*:BackendOps.Matmul*}
main_args=${2:---gemv}
base_args=${3:---gemv --ns 1,64 --types f16,bf16,q8_0}
bash .gpu/build.sh > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
source .gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
( cd build-cuda && HEADROOM_TEST_VERBOSE=1 timeout 120 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1 )
rc=$?
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]" "$out/tests.log" | head -20
grep -B2 -A12 "Failure" "$out/tests.log" | head -50
grep "worst error" "$out/tests.log" | sort -t= -k3 -g | tail -4
timeout 150 ./build-cuda/bench_cuda $main_args > "$out/bench.log" 2>&1; echo "bench rc $?"
HEADROOM_CUDA_SKINNY_MAX=0 timeout 60 ./build-cuda/bench_cuda $base_args > "$out/bench_base.log" 2>&1; echo "base rc $?"
cat "$out/bench.log" "$out/bench_base.log"
exit $rc
