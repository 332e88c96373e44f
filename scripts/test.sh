#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (GPU tests skip with a reason
# where there is no GPU). Extra arguments go to ctest, e.g. scripts/test.sh -L unit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir "${GROKIT_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" "$@"
