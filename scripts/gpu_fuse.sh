#!/usr/bin/env bash
# On the GPU machine, from the project root with .gpu sent along: the fused decode ops (issue 15). Builds, runs
# the CUDA op tests, checks greedy text CPU vs CUDA and fused vs unfused (HEADROOM_FUSE=0), then measures tg64
# of the 8B and 1B F16 synthetic models fused and unfused in the same run (alternating, 2 repetitions each), and
# with nsys (if the machine has it) counts kernels per decode step. Log: $OUT/fuse.log (or /tmp/fuse/fuse.log).
# HEADROOM_FUSE (src/model/llama.cpp): unset the default set, 0 none, all every fusion, or the names of those used.
# FUSE_QUICK=1: only the fused CUDA op tests and the matmul ones, parity on two models, and the 8B A/B also
# with each fusion left out in turn.
#   usage: [FUSE_QUICK=1] bash scripts/gpu_fuse.sh
set -uo pipefail
quick=${FUSE_QUICK:-0}
out=${OUT:-/tmp/fuse}; mkdir -p "$out"
stamp() { echo "== $1 $(date -u +%FT%TZ)"; }
{
  stamp build
  bash .gpu/build.sh -DHEADROOM_SERVER=OFF > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; tail -40 /tmp/headroom-build.log; exit 1; }
  source .gpu/env.sh
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
  B=build-cuda/headroom
  ( $B synth --shape llama3-8b --type f16 -o /tmp/l8b-f16.gguf > "$out/synth.log" 2>&1
    $B synth --shape llama3-1b --type f16 -o /tmp/l1b-f16.gguf >> "$out/synth.log" 2>&1 ) &
  synth=$!

  stamp tests
  ( cd build-cuda && filter='CudaBackendOps.*:BackendOps.Fused*'; [ $quick = 1 ] && filter='CudaBackendOps.Fused*:CudaBackendOps.Matmul*'
    timeout 150 ./headroom_backend_tests --gtest_filter="$filter" > "$out/tests.log" 2>&1; echo "backend tests rc $?" )
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \] CudaBackendOps.Fused" "$out/tests.log" | head -20
  grep -B2 -A8 "Failure" "$out/tests.log" | head -40

  stamp parity
  models="../shared/models/stories260K.gguf ../shared/models/tinystories-656k-q8_0.gguf ../shared/models/retrieval-14m-q8_0.gguf ../shared/models/arch/*.gguf"
  [ $quick = 1 ] && models="../shared/models/retrieval-14m-q8_0.gguf ../shared/models/arch/rand-qwen2-bias-bf16.gguf"
  for m in $models; do
    $B run -m $m -n 24 --temp 0 --device cpu -p "Once upon a time" > /tmp/g_cpu.txt 2>/dev/null
    $B run -m $m -n 24 --temp 0 --device cuda -p "Once upon a time" > /tmp/g_cuda.txt 2>/dev/null
    HEADROOM_FUSE=0 $B run -m $m -n 24 --temp 0 --device cuda -p "Once upon a time" > /tmp/g_cuda0.txt 2>/dev/null
    a=$(cmp -s /tmp/g_cpu.txt /tmp/g_cuda.txt && echo same || echo DIFFERS)
    b=$(cmp -s /tmp/g_cuda0.txt /tmp/g_cuda.txt && echo same || echo DIFFERS)
    echo "greedy $(basename $m): cpu vs cuda $a; cuda fused vs unfused $b"
  done
  printf '"Once upon a time"\n"The little dog"\n"Once upon a time"\n"In the park"\n' > /tmp/prompts.jsonl
  M=../shared/models/tinystories-656k-q8_0.gguf
  $B run -m $M -n 32 --temp 0 --device cuda --parallel 4 --prompts /tmp/prompts.jsonl > /tmp/par4.txt 2>/dev/null
  HEADROOM_FUSE=0 $B run -m $M -n 32 --temp 0 --device cuda --parallel 4 --prompts /tmp/prompts.jsonl > /tmp/par4u.txt 2>/dev/null
  $B run -m $M -n 32 --temp 0 --device cuda --parallel 1 --prompts /tmp/prompts.jsonl > /tmp/par1.txt 2>/dev/null
  cmp -s /tmp/par1.txt /tmp/par4.txt && echo "parallel 4 == parallel 1 (CUDA, fused)" || echo "parallel 4 DIFFERS from parallel 1 (CUDA, fused)"
  cmp -s /tmp/par4u.txt /tmp/par4.txt && echo "parallel 4 fused == unfused" || echo "parallel 4 fused DIFFERS from unfused"

  wait $synth; tail -2 "$out/synth.log"
  stamp bench
  for m in /tmp/l8b-f16.gguf /tmp/l1b-f16.gguf; do
    for f in default 0 all default 0 all; do
      [ $f = default ] && unset HEADROOM_FUSE || export HEADROOM_FUSE=$f
      $B bench -m $m --device cuda -p 0 -n 64 -d 0 -r 2 2>/dev/null | grep -E "tg64" | sed "s|\$|  fuse=$f $(basename $m)|"
    done
  done
  unset HEADROOM_FUSE
  if [ $quick = 1 ]; then
    for f in qkv,mlp,rope norm,mlp,rope norm,qkv,rope norm,qkv,mlp; do
      HEADROOM_FUSE=$f $B bench -m /tmp/l8b-f16.gguf --device cuda -p 0 -n 64 -d 0 -r 2 2>/dev/null | grep tg64 | sed "s|\$|  fuse=$f l8b|"
    done
  else
  HEADROOM_CUDA_GRAPHS=0 HEADROOM_FUSE=all $B bench -m /tmp/l1b-f16.gguf --device cuda -p 0 -n 64 -d 0 -r 2 2>/dev/null | grep tg64 | sed 's/$/  fuse=all graphs off l1b/'
  HEADROOM_CUDA_GRAPHS=0 HEADROOM_FUSE=0 $B bench -m /tmp/l1b-f16.gguf --device cuda -p 0 -n 64 -d 0 -r 2 2>/dev/null | grep tg64 | sed 's/$/  fuse=0 graphs off l1b/'
  fi

  NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
  if [ -n "$NSYS" ]; then
    stamp nsys
    for f in all 0; do
      HEADROOM_FUSE=$f timeout 90 $NSYS profile --cuda-graph-trace=node -o /tmp/p$f --force-overwrite true \
        $B bench -m /tmp/l1b-f16.gguf --device cuda -p 0 -n 16 -d 0 -r 1 > /dev/null 2>&1
      timeout 60 $NSYS stats --report cuda_gpu_kern_sum --format csv /tmp/p$f.nsys-rep 2>/dev/null | cut -c1-160 > "$out/kern_fuse$f.csv"
      echo "fuse=$f kernels:"; head -25 "$out/kern_fuse$f.csv"
    done
  else
    echo "no nsys on this machine"
  fi
  stamp done
} 2>&1 | tee "$out/fuse.log"
