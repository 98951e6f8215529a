#!/usr/bin/env bash
# Copies this worktree (sources, tests, bench, CMake, .gpu) into <session checkout>/.cudawt (ignored by git)
# so that a device run can carry it: run(..., carry=[".cudawt"]) and `cd .cudawt` there.
#   usage: scripts/gpu_sync.sh [session checkout, default /work/main]
set -euo pipefail
src=$(git rev-parse --show-toplevel); dst=${1:-/work/main}/.cudawt
rm -rf "$dst"; mkdir -p "$dst"
(cd "$src" && tar -cf - --exclude='./build*' --exclude=./.git --exclude=./fuzz/corpus-run .) | (cd "$dst" && tar -xf -)
du -sh "$dst"
