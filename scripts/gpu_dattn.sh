#!/usr/bin/env bash
# On the GPU machine (decode-attention work), from the project root with .gpu sent along: builds only the backend
# tests and bench_cuda, runs the attention tests (CUDA against the CPU, and the CPU ones), then
# `bench_cuda --attention-ab` (every decode row also timed through the legacy kernel). Logs go to $OUT.
#   usage: bash scripts/gpu_dattn.sh [gtest filter, default *Attention*:CudaBackendOps.KVRejects] [bench args]
set -uo pipefail
out=${OUT:-/tmp}; t0=$(date +%s)
filter=${1:-'*Attention*:CudaBackendOps.KVRejects'}; shift || true
D=/opt/deps; mkdir -p $D
for f in .gpu/debs/*.deb; do dpkg -x "$f" $D; done
export PATH=/usr/local/cuda/bin:$PATH LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PKG_CONFIG_SYSROOT_DIR=$D PKG_CONFIG_PATH=$D/usr/lib/x86_64-linux-gnu/pkgconfig:$D/usr/share/pkgconfig
export CMAKE_PREFIX_PATH=$D/usr
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DHEADROOM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DHEADROOM_SERVER=OFF -DSTB_INCLUDE_DIR=$D/usr/include/stb > "$out/cmake.log" 2>&1 || { tail -20 "$out/cmake.log"; exit 1; }
ninja -C build-cuda -j16 headroom_backend_tests bench_cuda > "$out/build.log" 2>&1 ||
  { grep -B2 -A12 -E "error|Error" "$out/build.log" | head -80; exit 1; }
echo "[dattn] built in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
( cd build-cuda && HEADROOM_TEST_VERBOSE=1 timeout 150 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1 )
rc=$?
# The A/B variants pass the same tests: the previous fast path for F16 too (tc0); DATTN_MODES=1 adds
# attn_fast_kernel's modes 1 and 3.
vars="HEADROOM_CUDA_ATTN_TC=0"
[ "${DATTN_MODES:-0}" = 1 ] && vars="$vars HEADROOM_CUDA_ATTN_FAST_MODE=1 HEADROOM_CUDA_ATTN_FAST_MODE=3"
for v in $vars; do
  m=${v##*_}; m=${m,,}; m=${m/=/}
  ( cd build-cuda && env $v timeout 60 ./headroom_backend_tests --gtest_filter='CudaBackendOps.Attention*' > "$out/tests-$m.log" 2>&1 )
  rcm=$?; [ $rc = 0 ] && rc=$rcm
  echo "[dattn] $v tests rc $rcm ($(grep -c '^\[       OK' "$out/tests-$m.log") ok)"
  grep -A8 "Failure" "$out/tests-$m.log" | head -20
done
echo "[dattn] tests rc $rc at $(( $(date +%s) - t0 )) s"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]" "$out/tests.log" | head -40
grep -B2 -A10 "Failure" "$out/tests.log" | head -60
left=$(( ${DATTN_BUDGET:-280} - ($(date +%s) - t0) ))
[ $left -gt 20 ] && timeout $left ./build-cuda/bench_cuda ${@:---attention-ab} > "$out/bench.log" 2>&1
echo "[dattn] bench rc $? at $(( $(date +%s) - t0 )) s"
cat "$out/bench.log"
exit $rc
