#!/usr/bin/env bash
# Device run for the prefill attention work: build, the CUDA op tests, then the prefill bench rows.
#   usage (on the GPU machine, from the synced copy): bash scripts/pattn_run.sh [gtest filter]
set -uo pipefail
out=${OUT:-/tmp}
bash scripts/gpu_test.sh --no-bench "${1:-CudaBackendOps.*}"; rc=$?
grep -E "prefill attention|worst" "$out/tests.log" | head -40
./build-cuda/bench_cuda --prefill 2>&1 | tee "$out/prefill.log"
exit $rc
