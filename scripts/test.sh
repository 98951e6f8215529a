#!/usr/bin/env bash
# The whole test suite: builds (via setup.sh), runs every GoogleTest test through CTest, then builds the
# libFuzzer targets with clang under ASan + UBSan and runs each for FUZZ_SECONDS (default 60) seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHEADROOM_CUDA=OFF -DCMAKE_C_COMPILER=clang \
        -DCMAKE_CXX_COMPILER=clang++ -DHEADROOM_FUZZ=ON -DHEADROOM_SANITIZE=ON >/dev/null
  ninja -C build-fuzz
  export HEADROOM_SHARED_DIR="${HEADROOM_SHARED_DIR:-$(cd .. && pwd)/shared}"
  for target in $(find build-fuzz -maxdepth 1 -type f -executable -name "fuzz_*" | sort); do
    name=$(basename "$target")
    corpus=build-fuzz/corpus/$name
    mkdir -p "$corpus"
    seeds=()
    [ "$name" = fuzz_gguf ] && [ -d /tmp/headroom-test-gguf-corpus ] && seeds+=(/tmp/headroom-test-gguf-corpus)
    echo "fuzz: $name for ${FUZZ_SECONDS}s"
    log=build-fuzz/$name.log
    rc=0
    "$target" -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 -rss_limit_mb=4096 -timeout=30 \
      "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?
    grep -E "^(stat::number_of_executed_runs|stat::peak_rss_mb|Done)" "$log" || true
    if [ "$rc" -ne 0 ]; then tail -n 60 "$log"; echo "fuzz: $name FAILED (exit $rc)"; exit 1; fi
  done
  echo "fuzz: all targets clean"
fi
