#!/usr/bin/env bash
# Here (Debian 12), after ../shared/gpu/stage.sh: puts into .gpu-srv/ (git-ignored; carry it, and copy it into .gpu/debs there before .gpu/build.sh) what the server build needs on the GPU
# machine, whose image lacks them: cpp-httplib's pkg-config file requires openssl, zlib and brotli, so their
# -dev packages (and Debian's libssl3/libbrotli1 they were built against). .gpu/build.sh unpacks them into
# /opt/deps like the rest, and CMake then finds cpp-httplib and builds `serve` and `bench --server`.
set -euo pipefail
mkdir -p "$(git rev-parse --show-toplevel)/.gpu-srv" && cd "$(git rev-parse --show-toplevel)/.gpu-srv"
apt-get download libssl-dev libssl3 zlib1g-dev libbrotli-dev libbrotli1 2>&1 | grep -v "^W: Download is performed unsandboxed" || true
ls libssl-dev_*.deb libbrotli-dev_*.deb zlib1g-dev_*.deb >/dev/null
