#!/usr/bin/env bash
# The CUDA kernels' host emulation (tests/gpu/test_cuda_emulation.cpp) built with
# ThreadSanitizer into build-tsan/ and run. Each emulated block's threads are real threads
# here (fibers elsewhere: tests/gpu/emu_block.h), its shared memory plain memory and its
# barriers std::barrier, so a kernel that orders a shared-memory access with no
# __syncthreads (or leans on a warp running in lockstep) shows up as a data race: a race
# check of the device code with no GPU. Needs the CUDA toolkit's compiler and headers;
# says so and exits 0 where they are absent.
# Usage: scripts/test-emulation-tsan.sh [gtest flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${GROKIT_TSAN_BUILD_DIR:-build-tsan}
if [ ! -f "$B/build.ninja" ]; then
  cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -Wno-tsan" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread \
    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread >/dev/null
fi
if ! grep -q "test_cuda_emulation" "$B/build.ninja"; then
  echo "test-emulation-tsan: skipped: no CUDA toolkit here (the emulation needs its compiler and headers)" >&2
  exit 0
fi
cmake --build "$B" -j "$(nproc)" --target test_cuda_emulation
# The emulation's guard handler (a touch before pdl_wait) writes its message from a signal.
TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0 ${TSAN_OPTIONS:-}" "$B/bin/test_cuda_emulation" --gtest_brief=1 "$@"
