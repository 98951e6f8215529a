#!/usr/bin/env bash
# On the GPU machine, with .gpu sent along (../shared/gpu/stage.sh --no-peer): builds with CUDA, then checks the
# model end to end against the CPU backend and measures. Runs detached; the log is $OUT/e2e.log.
#   correctness: the README passkey prompt, and eval episodes (full, profiled head map, topk) on CPU and CUDA;
#   speed:       headroom bench on synth llama3-8b F16 (tg64, pp2048, at depth 0 and 8192).
set -uo pipefail
out=${OUT:-/tmp}
log=$out/e2e.log
{
  echo "== build $(date +%T)"
  bash .gpu/build.sh > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  source .gpu/env.sh
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
  B=build-cuda/headroom
  M=../shared/models/retrieval-14m-q8_0.gguf
  P="The pass key is 4821930. Remember it. 4821930 is the pass key.\nWhat is the pass key? The pass key is"
  echo "== passkey $(date +%T)"
  for d in cpu cuda; do $B run -m $M -n 16 --temp 0 --device $d -p "$P" > "$out/passkey_$d.txt" 2> "$out/passkey_$d.err"; tail -1 "$out/passkey_$d.err"; done
  cmp "$out/passkey_cpu.txt" "$out/passkey_cuda.txt" && echo "passkey: identical"
  for m in ../shared/models/stories260K.gguf ../shared/models/tinystories-656k-q8_0.gguf ../shared/models/arch/*.gguf; do
    for d in cpu cuda; do $B run -m $m -n 24 --temp 0 --device $d -p "Once upon a time" > "$out/greedy_$d.txt" 2>/dev/null; done
    cmp -s "$out/greedy_cpu.txt" "$out/greedy_cuda.txt" && echo "greedy identical: $m" || { echo "greedy DIFFERS: $m"; cat "$out/greedy_cpu.txt" "$out/greedy_cuda.txt"; }
  done
  echo "== eval $(date +%T)"
  EV="--tasks niah,multikey,kv --ctx 4096 --depths 0:100:25 --samples 2 --policy full,profile,topk --budget 25% --head-map docs/retrieval-14m-heads.json"
  for d in cpu cuda; do /usr/bin/time -f "eval $d: %e s" $B eval -m $M $EV --device $d --parallel 8 -o "$out/eval_$d" > "$out/eval_$d.md" 2> "$out/eval_$d.err"; tail -1 "$out/eval_$d.err"; done
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
  grep -A8 "trained-task" "$out/eval_cuda.md" | head -6
  echo "== synth $(date +%T)"
  $B synth --shape llama3-8b --type f16 -o /tmp/l8b-f16.gguf > /dev/null 2>&1
  echo "== bench $(date +%T)"
  $B bench -m /tmp/l8b-f16.gguf --device cuda -p 2048 -n 64 -d 0,8192 -r 1
  $B bench -m /tmp/l8b-f16.gguf --device cuda -p 0 -n 32 --parallel 1,16 -r 1
  echo "== done $(date +%T)"
} > "$log" 2>&1
