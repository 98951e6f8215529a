#!/usr/bin/env bash
# On the GPU machine, from the project root, with .gpu (../shared/gpu/stage.sh --no-peer) and .gpu-srv
# (scripts/gpu_stage_server.sh) sent along: builds with CUDA and the server, then checks the model end to end
# against the CPU backend and measures, most important first. Meant to run detached:
#   setsid nohup bash scripts/gpu_e2e.sh > /tmp/e2e.out 2>&1 &     then poll $OUT/e2e.log (or /tmp/e2e/e2e.log)
# Poll at once: each polling call must start within the device's idle window (30 s) after the previous one
# ended, or the machine is given back and the detached run dies with it (lost a run on 2026-12-01):
# `bash scripts/gpu_wait.sh 280` (timeout_s 300), again and again until it says done.
# Stages (E2E_STAGES, default all): build parity tp bench8 map8 par8 serve bench1 kvq8 eval. E2E_SHORT=1 drops
# the A/B extras (graphs off, --chunk 2048, the full-KV server); E2E_DEPTHS8 / E2E_DEPTHS1 pick the bench depths.
set -uo pipefail
out=${OUT:-/tmp/e2e}; mkdir -p "$out"
log=$out/e2e.log
stages=" ${E2E_STAGES:-build parity tp bench8 map8 par8 serve bench1 kvq8 eval} "
on() { [[ "$stages" == *" $1 "* ]]; }
stamp() { echo "== $1 $(date +%T)"; }
{
  stamp build
  cp .gpu-srv/*.deb .gpu/debs/ 2>/dev/null || true
  export CPATH=/opt/deps/usr/include/x86_64-linux-gnu
  if ! bash .gpu/build.sh > "$out/build.log" 2>&1; then
    tail -20 /tmp/headroom-cmake.log; grep -m3 -B2 -A8 "error" /tmp/headroom-build.log
    echo "build with the server failed: again without it"; stages=${stages/ serve / }
    bash .gpu/build.sh -DHEADROOM_SERVER=OFF > "$out/build2.log" 2>&1 || { tail -30 /tmp/headroom-build.log; exit 1; }
  fi
  source .gpu/env.sh
  export CPATH=/opt/deps/usr/include/x86_64-linux-gnu
  grep -E "HEADROOM_SERVER|HEADROOM_CUDA" build-cuda/CMakeCache.txt | grep BOOL
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader
  B=build-cuda/headroom
  M=../shared/models/retrieval-14m-q8_0.gguf
  S=/tmp/l8b-f16.gguf
  ( $B synth --shape llama3-8b --type f16 -o $S --head-map /tmp/l8b-map.json > "$out/synth8.log" 2>&1
    $B synth --shape llama3-1b --type f16 -o /tmp/l1b-f16.gguf --head-map /tmp/l1b-map.json > "$out/synth1.log" 2>&1 ) &
  synth=$!

  if on parity; then
    stamp parity
    ( cd build-cuda && ./headroom_backend_tests --gtest_filter='Cuda*' > "$out/tests.log" 2>&1; echo "backend tests rc $?" )
    grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$out/tests.log" | head -20
    P="The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is"
    for d in cpu cuda; do $B run -m $M -n 16 --temp 0 --device $d -p "$P" > "$out/passkey_$d.txt" 2> "$out/passkey_$d.err"; tail -1 "$out/passkey_$d.err"; done
    cmp "$out/passkey_cpu.txt" "$out/passkey_cuda.txt" && echo "passkey: identical: $(cat $out/passkey_cuda.txt | tail -c 40)"
    for m in ../shared/models/stories260K.gguf ../shared/models/tinystories-656k-q8_0.gguf $M ../shared/models/arch/*.gguf; do
      for d in cpu cuda; do $B run -m $m -n 24 --temp 0 --device $d -p "Once upon a time" > "$out/greedy_$d.txt" 2>/dev/null; done
      cmp -s "$out/greedy_cpu.txt" "$out/greedy_cuda.txt" && echo "greedy identical: $m" || { echo "greedy DIFFERS: $m"; cat "$out/greedy_cpu.txt" "$out/greedy_cuda.txt"; }
    done
    # parallel decode on CUDA: the same greedy text alone and in a batch of 4 (batch invariance end to end)
    printf '"Once upon a time"\n"The little dog"\n"Once upon a time"\n"In the park"\n' > /tmp/prompts.jsonl
    $B run -m ../shared/models/tinystories-656k-q8_0.gguf -n 32 --temp 0 --device cuda --parallel 4 --prompts /tmp/prompts.jsonl > "$out/par4.txt" 2>/dev/null
    $B run -m ../shared/models/tinystories-656k-q8_0.gguf -n 32 --temp 0 --device cuda --parallel 1 --prompts /tmp/prompts.jsonl > "$out/par1.txt" 2>/dev/null
    cmp -s "$out/par1.txt" "$out/par4.txt" && echo "parallel 4 == parallel 1 (CUDA)" || echo "parallel 4 DIFFERS from parallel 1 (CUDA)"
    # the host's part of a step on this machine's CPU (planning, sampling), if Google Benchmark was built
    [ -x build-cuda/bench/bench_host ] && build-cuda/bench/bench_host 2>&1 | grep -E "^BM_" | awk '{print $1, $2, $3, $6, $7}'
  fi
  # NCCL: the copy PyTorch installs (pip's nvidia-nccl), else any libnccl.so.2 on the machine.
  NL=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
  [ -f "$NL" ] || NL=$(find /usr /opt /root /home -name 'libnccl.so.2*' 2>/dev/null | head -1)
  [ -n "$NL" ] && export HEADROOM_NCCL_LIB=$NL
  if on tp; then
    stamp tp
    echo "nccl: ${NL:-none found}"
    ( cd build-cuda && ./headroom_tests --gtest_filter='CudaTensorParallel.*:Cli.TensorParallel*' > "$out/tp.log" 2>&1; echo "tp tests rc $?" )
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|tp cuda" "$out/tp.log" | head -20
    grep -B2 -A6 "Failure" "$out/tp.log" | head -30
    P="The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is"
    HEADROOM_TP_COMM=nccl $B run -m $M -n 16 --temp 0 --device cuda -p "$P" > "$out/passkey_nccl1.txt" 2> "$out/passkey_nccl1.err"
    cmp "$out/passkey_cuda.txt" "$out/passkey_nccl1.txt" && echo "passkey: NCCL world 1 identical" || tail -2 "$out/passkey_nccl1.err"
    HEADROOM_TP_COMM=threads $B run -m $M -n 16 --temp 0 --device cuda -tp 2 -p "$P" > "$out/passkey_tp2.txt" 2> "$out/passkey_tp2.err"
    grep -E "tensor parallel|rank" "$out/passkey_tp2.err" | head -4
    cmp "$out/passkey_cuda.txt" "$out/passkey_tp2.txt" && echo "passkey: 2 CUDA ranks on one GPU identical" || tail -2 "$out/passkey_tp2.err"
    $B run -m $M -n 4 --device cuda -tp 2 -p hi 2>&1 | tail -1
  fi
  wait $synth; tail -1 "$out/synth8.log"
  if on bench8; then
    stamp bench8
    $B bench -m $S --device cuda -p 2048 -n 64 -d ${E2E_DEPTHS8:-0,8192,32768,131072} -r 2
    [ -n "${E2E_SHORT:-}" ] || HEADROOM_CUDA_GRAPHS=0 $B bench -m $S --device cuda -p 0 -n 64 -d 0 -r 2 | tail -1 | sed 's/$/  (graphs off)/'
    HEADROOM_TP_COMM=nccl $B bench -m $S --device cuda -p 0 -n 64 -d 0 -r 2 | tail -1 | sed 's/$/  (NCCL world 1)/'
  fi
  if on map8; then
    stamp map8
    $B bench -m $S --device cuda -p 2048 -n 64 -d 131072 -r 2 --head-map /tmp/l8b-map.json
    # prefill split-KV off (the A/B), and chunks of 2048 rows (llama.cpp's n_batch) with it on
    HEADROOM_CUDA_PF_SPLIT=0 $B bench -m $S --device cuda -p 2048 -n 0 -d 131072 -r 2 --head-map /tmp/l8b-map.json | tail -1 | sed 's/$/  (prefill split-KV off)/'
    [ -n "${E2E_SHORT:-}" ] || $B bench -m $S --device cuda -p 2048 -n 0 -d 131072 -r 2 --head-map /tmp/l8b-map.json --chunk 2048 | tail -1 | sed 's/$/  (--chunk 2048)/'
  fi
  if on par8; then
    stamp par8
    $B bench -m $S --device cuda -p 0 -n 32 -d 8192 --parallel 1,8,32 -r 1
  fi
  if on serve; then
    stamp serve
    $B serve -m $S --device cuda --port 8090 -c 4096 --parallel 32 --head-map /tmp/l8b-map.json > "$out/serve.log" 2>&1 &
    srv=$!
    for i in $(seq 60); do curl -sf http://127.0.0.1:8090/health >/dev/null && break; sleep 1; done
    $B bench --server http://127.0.0.1:8090 --clients 1,4,16,32 --requests 2 --prompt-words 1500 -n 128
    curl -s http://127.0.0.1:8090/metrics | grep -E "^headroom_kv_pages|^headroom_requests" | head -12
    kill -TERM $srv; wait $srv; echo "serve exit $?"
    if [ -z "${E2E_SHORT:-}" ]; then
      $B serve -m $S --device cuda --port 8091 -c 4096 --parallel 32 > "$out/serve_full.log" 2>&1 &
      srv=$!
      for i in $(seq 60); do curl -sf http://127.0.0.1:8091/health >/dev/null && break; sleep 1; done
      $B bench --server http://127.0.0.1:8091 --clients 16,32 --requests 2 --prompt-words 1500 -n 128 | sed 's/$/  (full KV)/'
      kill -TERM $srv; wait $srv
    fi
  fi
  if on bench1; then
    stamp bench1
    $B bench -m /tmp/l1b-f16.gguf --device cuda -p 2048 -n 64 -d ${E2E_DEPTHS1:-0,32768,131072} -r 2
    $B bench -m /tmp/l1b-f16.gguf --device cuda -p 0 -n 64 -d 131072 -r 2 --head-map /tmp/l1b-map.json
  fi
  if on kvq8; then
    stamp kvq8
    $B bench -m $S --device cuda -p 0 -n 64 -d 131072 -r 2 --kv-type q8_0
    # the map with topk (4096 tokens per step: the sink page, 125 chosen and 2 recent pages of 32, the others in
    # the host tier) in place of streaming (what `synth --map-rest topk` writes)
    python3 - /tmp/l8b-map.json /tmp/l8b-map-topk.json <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for h in m["heads"]:
    if h["policy"] == "streaming":
        for k in ("sinks", "window", "prefill"): h.pop(k, None)
        h.update(policy="topk", topk_pages=125, recent_pages=2, offload=1)
json.dump(m, open(sys.argv[2], "w"))
PY
    $B bench -m $S --device cuda -p 0 -n 64 -d 131072 -r 2 --head-map /tmp/l8b-map-topk.json
  fi
  if on eval; then
    stamp eval
    EV="--tasks niah,multikey,kv --ctx 4096 --depths 0:100:25 --samples 2 --policy full,profile,topk --budget 25% --head-map docs/retrieval-14m-heads.json"
    for d in cpu cuda; do /usr/bin/time -f "eval $d: %e s" $B eval -m $M $EV --device $d --parallel 8 -o "$out/eval_$d" > "$out/eval_$d.md" 2> "$out/eval_$d.err"; tail -3 "$out/eval_$d.err"; done
    python3 - "$out" <<'PY'
import json, sys
o = sys.argv[1]
a = json.load(open(f"{o}/eval_cpu/results.json")); b = json.load(open(f"{o}/eval_cuda/results.json"))
ea = a["episodes"] if isinstance(a, dict) else a; eb = b["episodes"] if isinstance(b, dict) else b
same = sum(x["answer"] == y["answer"] for x, y in zip(ea, eb))
print(f"eval: {same}/{len(ea)} answers identical CPU vs CUDA")
for x, y in zip(ea, eb):
    if x["answer"] != y["answer"]: print("  differs:", x["config"], x["task"], x["depth"], repr(x["answer"]), repr(y["answer"]))
PY
  fi
  stamp done
} > "$log" 2>&1
