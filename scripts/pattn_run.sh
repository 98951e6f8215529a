#!/usr/bin/env bash
# Device run for the prefill attention work: build (retrying only the two targets it needs, and showing the
# first FAILED block of a failed full build), the CUDA op tests, then the prefill bench rows. (The 2026-12-01 run
# also ran the prefill tests and rows with a 4-warp variant, since removed.)
#   usage (on the GPU machine, from the synced copy): bash scripts/pattn_run.sh
set -uo pipefail
out=${OUT:-/tmp}
bash .gpu/build.sh > "$out/build.log" 2>&1; echo "build.sh rc $?"
cp /tmp/headroom-build.log "$out/hb1.log" 2>/dev/null
grep -v "ptxas warning" "$out/hb1.log" | grep -A12 FAILED | head -30
source .gpu/env.sh
ninja -C build-cuda -j12 headroom_backend_tests bench_cuda > "$out/ninja2.log" 2>&1 ||
  { grep -v "ptxas warning" "$out/ninja2.log" | grep -A25 FAILED | head -60; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
cd build-cuda
HEADROOM_TEST_VERBOSE=1 timeout 110 ./headroom_backend_tests --gtest_filter='CudaBackendOps.*' > "$out/tests.log" 2>&1; rc=$?
echo "tests rc $rc"
for f in tests; do
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]|prefill attention" "$out/$f.log" | head -40
  grep -B2 -A10 "Failure" "$out/$f.log" | head -40
done
timeout 100 ./bench_cuda --prefill 2>&1 | tee "$out/prefill8.log"
exit $rc
