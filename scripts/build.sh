#!/usr/bin/env bash
# Configures and builds grokit into build/ (CUDA plugin included when nvcc is found).
# Extra arguments go to CMake, e.g. scripts/build.sh -DGROKIT_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${GROKIT_BUILD_DIR:-build}
if [ ! -f "$BUILD_DIR/build.ninja" ] || [ $# -gt 0 ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja "$@" >/dev/null
fi
cmake --build "$BUILD_DIR" -j "$(nproc)"
