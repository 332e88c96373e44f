#!/usr/bin/env bash
# Builds everything with AddressSanitizer + UndefinedBehaviorSanitizer (clang, CUDA off)
# into build-asan/ and runs the unit and end-to-end tests against the instrumented
# binaries. clang, not the default gcc: its UBSan also checks array indices against
# their bounds, and CI then compiles the libraries with a second compiler.
# --unit-only: only the unit tests (every library, no grokit binary, no end-to-end runs):
# what CI runs, about 5.5 minutes on a 2-core host; the whole build and the end-to-end
# runs take about 11.
# Usage: scripts/test-sanitize.sh [--unit-only] [ctest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT_ONLY=0
if [ "${1:-}" = "--unit-only" ]; then
  UNIT_ONLY=1
  shift
fi
B=${GROKIT_ASAN_BUILD_DIR:-build-asan}
if [ ! -f "$B/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$B" -G Ninja -DGROKIT_SANITIZE=ON -DGROKIT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
if [ "$UNIT_ONLY" = 1 ]; then
  targets=()
  for f in tests/unit/test_*.cpp; do targets+=("$(basename "$f" .cpp)"); done
  cmake --build "$B" -j "$(nproc)" --target "${targets[@]}"
  set -- -L unit "$@"
else
  cmake --build "$B" -j "$(nproc)"
fi
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export GROKIT_SANITIZED=1  # tests that cap address space skip the cap (ASan reserves terabytes)
ctest --test-dir "$B" --output-on-failure -j "$(nproc)" "$@"
