#!/usr/bin/env bash
# On the GPU machine (like gpu_test.sh): build, the matmul op tests, then the matmul benchmark rows with the
# tensor-core skinny GEMM (default) and a baseline pass with it off (HEADROOM_CUDA_SKINNY_MAX=0: GEMV / cuBLAS).
#   usage: bash scripts/gpu_gemm.sh [gtest filter] [bench args for the main pass] [bench args for the baseline]
set -uo pipefail
out=${OUT:-/tmp}
filter=${1:-CudaBackendOps.Matmul*:BackendOps.Matmul*}
main_args=${2:---gemv --ns 1,2,4,8,16,32,64,128}
base_args=${3:---gemv --ns 1,64 --types f16,bf16,q8_0}
# Only the two targets (a failure elsewhere in the tree must not stop this run).
if ! bash .gpu/build.sh -DHEADROOM_SERVER=OFF > "$out/build.log" 2>&1; then
  grep -A12 "FAILED" /tmp/headroom-build.log | grep -v "ptxas warning" | head -30
  source .gpu/env.sh
  ninja -C build-cuda -j16 headroom_backend_tests bench_cuda > "$out/build2.log" 2>&1 || { grep -v "ptxas warning" "$out/build2.log" | grep -A12 FAILED | head -40; exit 1; }
fi
source .gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
( cd build-cuda && HEADROOM_TEST_VERBOSE=1 timeout 60 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1 )
rc=$?
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]" "$out/tests.log" | head -20
grep -B2 -A12 "Failure" "$out/tests.log" | head -50
grep "worst error" "$out/tests.log" | sort -t= -k3 -g | tail -4
timeout 130 ./build-cuda/bench_cuda $main_args > "$out/bench.log" 2>&1; echo "bench rc $?"
HEADROOM_CUDA_SKINNY_MAX=0 timeout 40 ./build-cuda/bench_cuda $base_args > "$out/bench_base.log" 2>&1; echo "base rc $?"
cat "$out/bench.log" "$out/bench_base.log"
exit $rc
