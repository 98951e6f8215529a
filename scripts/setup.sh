#!/usr/bin/env bash
# Installs the Debian packages headroom needs (idempotent: apt-get runs only if something is missing), then
# configures and builds into build/ (Release). Usage: scripts/setup.sh [extra cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ninja-build pkg-config libcli11-dev nlohmann-json3-dev libcpp-httplib-dev
      libspdlog-dev libfmt-dev libpcre2-dev libstb-dev fonts-dejavu-core libgtest-dev libgmock-dev
      libbenchmark-dev clang libclang-rt-14-dev curl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Node (for the OpenAI SDK test client) if the machine has none: Debian's nodejs is 18, which openai 4.x runs on.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing nodejs npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
# The official OpenAI SDK for tests/test_server.cpp (pinned: 4.x runs on Node 18-20; 5.x needs Node 22).
if [ ! -f build/npm/node_modules/openai/package.json ]; then
  echo "setup: npm install openai@4.95.0 into build/npm"
  npm install --prefix build/npm openai@4.95.0 --no-audit --no-fund --loglevel=error >/dev/null
fi
ninja -C build
