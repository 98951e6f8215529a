#!/usr/bin/env bash
# On the GPU machine: waits for a detached scripts/gpu_e2e.sh run, up to SECONDS (default 280), returning as soon
# as its log says "== done", and prints the log. Call it again at once (within the device's 30 s idle window)
# until it reports done: the machine, and the detached run with it, is given back when no command follows.
#   usage: bash scripts/gpu_wait.sh [SECONDS] [LOG, default /tmp/e2e/e2e.log]
secs=${1:-280}; log=${2:-/tmp/e2e/e2e.log}
for ((i = 0; i < secs; i += 5)); do
  grep -q '^== done' "$log" 2>/dev/null && break
  sleep 5
done
grep -q '^== done' "$log" 2>/dev/null && echo "[wait] the run is done" || echo "[wait] still running: call again now"
grep -v '^| ---\|^| model' "$log" 2>/dev/null | tail -60
