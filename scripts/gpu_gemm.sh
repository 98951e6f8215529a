#!/usr/bin/env bash
# On the GPU machine (like gpu_test.sh): build the two targets, the matmul op tests (again under each
# "VAR=VALUE" of GEMM_TEST_ENVS), then the matmul benchmark rows once per pass of GEMM_PASSES (side by side) and a
# baseline pass with the skinny kernels off (HEADROOM_CUDA_SKINNY_MAX=0: GEMV / cuBLAS).
#   usage: bash scripts/gpu_gemm.sh [gtest filter] [bench args for the passes] [bench args for the baseline]
#   An empty argument skips that part.
set -uo pipefail
out=${OUT:-/tmp}
filter=${1-CudaBackendOps.Matmul*:BackendOps.Matmul*}
main_args=${2---gemv --ns 1,2,4,8,16,32,64,128}
base_args=${3---gemv --ns 1,64 --types f16,bf16,q8_0}
t0=$(date +%s)
# Only the two targets (a failure elsewhere in the tree must not stop this run). The deps and env.sh as .gpu/build.sh.
D=/opt/deps; mkdir -p $D
for f in .gpu/debs/*.deb; do dpkg -x "$f" $D; done
cat > .gpu/env.sh <<EOT
export PATH=/usr/local/cuda/bin:\$PATH LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:\${LD_LIBRARY_PATH:-}
export PKG_CONFIG_SYSROOT_DIR=$D PKG_CONFIG_PATH=$D/usr/lib/x86_64-linux-gnu/pkgconfig:$D/usr/share/pkgconfig
export CMAKE_PREFIX_PATH=$D/usr
EOT
source .gpu/env.sh
[ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DHEADROOM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DSTB_INCLUDE_DIR=$D/usr/include/stb -DHEADROOM_SERVER=OFF > "$out/cmake.log" 2>&1 || { tail -20 "$out/cmake.log"; exit 1; }
ninja -C build-cuda -j16 headroom_backend_tests bench_cuda > "$out/build.log" 2>&1 || { grep -v "ptxas warning" "$out/build.log" | grep -A12 FAILED | head -40; exit 1; }
echo "[built in $(( $(date +%s) - t0 )) s]"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
rc=0
if [ -n "$filter" ]; then
  ( cd build-cuda && HEADROOM_TEST_VERBOSE=1 timeout 90 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1 )
  rc=$?
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]" "$out/tests.log" | head -20
  grep -B2 -A12 "Failure" "$out/tests.log" | head -50
  grep "worst error" "$out/tests.log" | sort -t= -k2 -g | tail -4
  for v in ${GEMM_TEST_ENVS:-}; do
    lg="$out/tests_$(echo "$v" | tr -c 'A-Za-z0-9_\n' '_').log"  # names the device tool brings back
    ( cd build-cuda && env $v HEADROOM_TEST_VERBOSE=1 timeout 90 ./headroom_backend_tests --gtest_filter="$filter" > "$lg" 2>&1 )
    r=$?; [ $r = 0 ] || rc=$r
    echo "-- tests with $v: rc $r"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$lg" | head -5
    grep -B2 -A12 "Failure" "$lg" | head -30
  done
  echo "[tests done at $(( $(date +%s) - t0 )) s]"
fi
# Passes over the same rows: the default kernel, then each "NAME:VAR=VALUE[,VAR=VALUE]" of GEMM_PASSES (default: the previous
# kernel alone, v1:HEADROOM_CUDA_SKINNY_V2=0), printed side by side (us and GB/s per pass).
passes=("new:" ${GEMM_PASSES-v1:HEADROOM_CUDA_SKINNY_V2=0})
if [ -n "$main_args" ]; then
  for p in "${passes[@]}"; do
    name=${p%%:*}; var=${p#*:}
    env ${var//,/ } timeout 100 ./build-cuda/bench_cuda $main_args > "$out/bench_$name.log" 2>&1; echo "$name ($var) rc $?"
  done
fi
[ -n "$base_args" ] && { HEADROOM_CUDA_SKINNY_MAX=0 timeout 40 ./build-cuda/bench_cuda $base_args > "$out/bench_base.log" 2>&1; echo "base rc $?"; }
echo "[all done at $(( $(date +%s) - t0 )) s]"
if [ -n "$main_args" ]; then
  hdr="shape type n"; cols=()
  for p in "${passes[@]}"; do
    name=${p%%:*}; hdr="$hdr | $name us GB/s"
    grep -E "^[18]B " "$out/bench_$name.log" | awk '{print $(NF-2), $(NF-1)}' > "/tmp/gemm_col_$name"; cols+=("/tmp/gemm_col_$name")
  done
  echo "$hdr"
  paste -d' ' <(grep -E "^[18]B " "$out/bench_new.log" | awk '{printf "%s_%s_%s %s %s\n", $1, $2, $3, $4, $5}') "${cols[@]}" | awk '{printf "%-28s", $1; for (i = 2; i <= NF; ++i) printf " %7s", $i; print ""}'
fi
[ -f "$out/bench_base.log" ] && grep -E "^[18]B " "$out/bench_base.log"
exit $rc
