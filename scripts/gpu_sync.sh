#!/usr/bin/env bash
# Copies this worktree (sources, tests, bench, CMake; not .git, build dirs or .gpu) into
# /work/main/<NAME> (NAME starts with ".cuda", ignored by git) so that a device run can carry it beside
# the staged .gpu kit:
#   scripts/gpu_sync.sh .cuda-mine
#   run(command="cd .cuda-mine && ln -sfn ../.gpu .gpu && bash scripts/gpu_test.sh ...", carry=[".gpu", ".cuda-mine"])
#   usage: scripts/gpu_sync.sh [NAME, default .cudawt] [session checkout, default /work/main]
set -euo pipefail
name=${1:-.cudawt}; case "$name" in .cuda*) ;; *) echo "gpu_sync: NAME must start with .cuda" >&2; exit 1;; esac
src=$(git rev-parse --show-toplevel); dst=${2:-/work/main}/$name
rm -rf "$dst"; mkdir -p "$dst"
(cd "$src" && tar -cf - --exclude='./build*' --exclude=./.git --exclude=./.gpu --exclude='./.cuda*' \
  --exclude=./fuzz/corpus-run .) | (cd "$dst" && tar -xf -)
du -sh "$dst"
