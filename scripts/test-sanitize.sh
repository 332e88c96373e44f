#!/usr/bin/env bash
# Builds everything with AddressSanitizer + UndefinedBehaviorSanitizer (CUDA off) into
# build-asan/ and runs the unit and end-to-end tests against the instrumented binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${GROKIT_ASAN_BUILD_DIR:-build-asan}
if [ ! -f "$B/build.ninja" ]; then
  cmake -S . -B "$B" -G Ninja -DGROKIT_SANITIZE=ON -DGROKIT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
cmake --build "$B" -j "$(nproc)"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export GROKIT_SANITIZED=1  # tests that cap address space skip the cap (ASan reserves terabytes)
ctest --test-dir "$B" --output-on-failure -j "$(nproc)" "$@"
