#!/usr/bin/env bash
# On the GPU machine, in one foreground command (when little device time is left): build, the CUDA
# tensor-parallel test, then the 8B rows at 128k (full KV and the head map) and batched decode at 8k.
set -uo pipefail
t0=$(date +%s)
bash .gpu/build.sh -DHEADROOM_SERVER=OFF > /tmp/build.log 2>&1 || { tail -30 /tmp/headroom-build.log; exit 1; }
source .gpu/env.sh
echo "[quick] built at $(( $(date +%s) - t0 )) s"
B=build-cuda/headroom S=/tmp/l8b-f16.gguf
$B synth --shape llama3-8b --type f16 -o $S --head-map /tmp/l8b-map.json > /tmp/synth.log 2>&1 &
NL=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
export HEADROOM_NCCL_LIB=$NL
( cd build-cuda && timeout 60 ./headroom_tests --gtest_filter='CudaTensorParallel.*' 2>&1 | grep -E "tp cuda|OK|FAILED|Failure|exception" | head -12 )
wait
echo "[quick] synth done at $(( $(date +%s) - t0 )) s"
$B bench -m $S --device cuda -p 2048 -n 64 -d 131072 -r 1 2>&1 | grep -v '^| ---\|^| model'
echo "[quick] at $(( $(date +%s) - t0 )) s"
$B bench -m $S --device cuda -p 2048 -n 64 -d 131072 -r 1 --head-map /tmp/l8b-map.json 2>&1 | grep -v '^| ---\|^| model'
echo "[quick] at $(( $(date +%s) - t0 )) s"
$B bench -m $S --device cuda -p 0 -n 32 -d 8192 --parallel 1,8,32 -r 1 2>&1 | grep -v '^| ---\|^| model'
echo "[quick] done at $(( $(date +%s) - t0 )) s"
