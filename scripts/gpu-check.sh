#!/usr/bin/env bash
# The GPU checks in one call, on a bare machine with an NVIDIA GPU, the CUDA driver and
# python3 with numpy and ml_dtypes, but none of grokit's build dependencies.
#
#   scripts/gpu-check.sh --prepare    on a development machine (our Debian packages,
#                                     nvcc): builds the CUDA build (sm_80, sm_90) into
#                                     build-gpu/ and gathers what the GPU machine needs into
#                                     .gpu-check/ (binaries, the CUDA plugin, and the
#                                     shared libraries they use that a bare machine lacks)
#   scripts/gpu-check.sh              on the GPU machine, with .gpu-check/ carried along:
#                                     the GPU unit tests (the op parity harness), the CUDA
#                                     end-to-end tests (TP 1/2/4/8 on one GPU against
#                                     scripts/reference.py), then the benchmarks, and where
#                                     Nsight Compute is installed each of the benchmark's
#                                     kernels timed alone (profile.txt, ranked by
#                                     scripts/ncu_summary.py); a short table last. Full
#                                     logs under $OUT (else ./gpu-check-out), 8 files at most.
#   scripts/gpu-check.sh --steps bench,profile
#                                     only those steps (of devices, parity, host-ops, e2e,
#                                     bench, profile): a second run that takes what the
#                                     first left undone, in less of the device's time
# Runs in well under 5 minutes on an H100/H200; each step has a time limit, and the summary
# is written however the script ends. Exit status: non-zero if a check failed, 2 if the
# carried binaries were built from other sources than this tree.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.gpu-check
# The sources the carried binaries are built from (checked against the tree at run time).
BUILT_FROM=(CMakeLists.txt cli common convert format kernels quantize runner validate tests/CMakeLists.txt tests/gpu
            tests/unit)

if [ "${1:-}" = "--prepare" ]; then
  set -e
  scripts/install-deps.sh >/dev/null
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DGROKIT_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
  cmake --build build-gpu -j "$(nproc)" --target grokit grokit_cuda test_gpu_parity test_host_ops
  rm -rf "$CARRY"
  mkdir -p "$CARRY/bin" "$CARRY/lib" "$CARRY/deps"
  cp build-gpu/bin/grokit build-gpu/bin/test_gpu_parity build-gpu/bin/test_host_ops "$CARRY/bin/"
  cp build-gpu/lib/libgrokit_cuda.so "$CARRY/lib/"
  strip --strip-debug "$CARRY"/bin/* "$CARRY"/lib/*
  # The shared libraries a bare machine lacks: everything but the C/C++ runtime and the
  # CUDA driver/toolkit (those are there).
  for f in "$CARRY"/bin/* "$CARRY"/lib/*; do
    ldd "$f" | awk '/=> \// {print $3}'
  done | sort -u | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|libresolv.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
      libcuda.so*|libcudart.so*|libcublas*|libnccl*|libcufile*) ;;
      *) cp -L "$lib" "$CARRY/deps/" ;;
    esac
  done
  # What the binaries were built from: the run refuses a bundle older than the sources.
  git ls-files -z -- "${BUILT_FROM[@]}" | xargs -0 sha256sum > "$CARRY/SOURCES.sha256"
  git log -1 --format='%H' > "$CARRY/COMMIT"
  grep -qxF '/.gpu-check/' .git/info/exclude 2>/dev/null || echo '/.gpu-check/' >> .git/info/exclude
  du -sh "$CARRY" | awk '{print "gpu-check: prepared " $2 " (" $1 "); carry .gpu-check and run scripts/gpu-check.sh"}'
  exit 0
fi

STEPS=(devices parity host-ops e2e bench profile)
SELECTED=" ${STEPS[*]} "
if [ "${1:-}" = "--steps" ] && [ -n "${2:-}" ]; then
  SELECTED=" ${2//,/ } "
  for k in $SELECTED; do
    case " ${STEPS[*]} " in
      *" $k "*) ;;
      *) echo "gpu-check: --steps: unknown step '$k' (the steps: ${STEPS[*]})" >&2; exit 2 ;;
    esac
  done
elif [ $# -gt 0 ]; then
  echo "usage: scripts/gpu-check.sh [--prepare | --steps STEP,STEP...]" >&2
  exit 2
fi

selected() { [[ $SELECTED == *" $1 "* ]]; }

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
if [ ! -x "$CARRY/bin/grokit" ]; then
  echo "gpu-check: $CARRY is missing: run 'scripts/gpu-check.sh --prepare' on a development machine and carry" \
       "the .gpu-check folder along" | tee "$OUT/summary.txt" >&2
  exit 2
fi
if [ ! -f "$CARRY/SOURCES.sha256" ] || ! sha256sum --check --quiet "$CARRY/SOURCES.sha256" > "$OUT/stale.txt" 2>&1; then
  echo "gpu-check: $CARRY was built from other sources than this tree (built at commit $(cat "$CARRY/COMMIT" 2>/dev/null));" \
       "run 'scripts/gpu-check.sh --prepare' again. $(grep -c ": FAILED" "$OUT/stale.txt") files differ (listed in $OUT/stale.txt)" \
       | tee "$OUT/summary.txt" >&2
  exit 2
fi
rm -f "$OUT/stale.txt"  # kept only when stale: at most 8 files come back from a lent machine
export LD_LIBRARY_PATH="$CARRY/deps${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GROKIT_CUDA_PLUGIN="$CARRY/lib/libgrokit_cuda.so"
export GROKIT_BIN="$CARRY/bin/grokit"
export GROKIT_SOURCE_DIR="$ROOT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Here a CUDA test that cannot run fails instead of skipping, and no grokit call in the
# end-to-end tests may hang the run.
export GROKIT_REQUIRE_CUDA=1 GROKIT_TEST_TIMEOUT=120
# cuBLASLt and NCCL from the toolkit or from Python's nvidia-* wheels, where present.
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib $(python3 -c '
import importlib, os
for m in ("nvidia.cublas", "nvidia.nccl", "nvidia.cu13"):
    try:
        print(os.path.join(importlib.import_module(m).__path__[0], "lib"))
    except Exception:
        pass' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
done

declare -A RESULT
step() {  # name, log, time limit (s), command...: a step that hangs is killed, the rest still run
  local name=$1 log=$2 limit=$3
  shift 3
  if ! selected "$name"; then
    RESULT[$name]="not selected (--steps)"
    return 0
  fi
  local t0=$SECONDS
  echo "== $name" >&2
  timeout -k 10 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    RESULT[$name]="TIMEOUT after $limit s, log $log"
  else
    RESULT[$name]="rc $rc, $((SECONDS - t0)) s, log $log"
  fi
  tail -n 5 "$OUT/$log" >&2
  return $rc
}

FAILED=0
{ nvidia-smi; echo; uname -a; git -C "$ROOT" log -1 --format='commit %H %cs' 2>/dev/null; } > "$OUT/machine.txt" 2>&1
# The summary is written however the script ends (a step killed, the caller's time limit).
summary() {
  {
    echo "gpu-check $(date -u +%Y-%m-%dT%H:%MZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "built from commit $(cat "$CARRY/COMMIT" 2>/dev/null || echo '?')"
    for k in "${STEPS[@]}"; do printf '  %-9s %s\n' "$k" "${RESULT[$k]:-not run}"; done
    grep -E '^\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ test' "$OUT/parity.log" 2>/dev/null
    grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/parity.log" 2>/dev/null | sort -u | head -n 20
    grep -E '^(OK|FAILED)' "$OUT/e2e.log" 2>/dev/null
    echo
    cat "$OUT/bench.txt" 2>/dev/null
    if [ -f "$OUT/profile.txt" ]; then
      echo
      echo "where the benchmark's kernel time went (ncu, kernels serialized; full table in profile.txt):"
      python3 "$ROOT/scripts/ncu_summary.py" "$OUT/profile.txt" --top 25 2>/dev/null
    fi
  } > "$OUT/summary.txt"
  cat "$OUT/summary.txt"
}
trap summary EXIT
trap 'exit 143' TERM INT

step devices devices.log 30 "$GROKIT_BIN" devices || FAILED=1
step parity parity.log 120 "$CARRY/bin/test_gpu_parity" --gtest_brief=0 || FAILED=1
step host-ops host_ops.log 30 "$CARRY/bin/test_host_ops" --gtest_brief=1 || FAILED=1
step e2e e2e.log 240 python3 tests/gpu/test_cuda_e2e.py -v || FAILED=1
step bench bench.txt 120 "$GROKIT_BIN" bench-device --device cuda --sweep --work "${TMPDIR:-/tmp}" || FAILED=1
# Every kernel of the decode steps (one eager step and one graph replay per scheme) and of
# one 4096-token prefill, timed alone with its DRAM throughput, where Nsight Compute is
# installed: the first thing to read when a ratio is short of its target. Two profiler
# runs, one section each. Caches are not flushed between kernels (--cache-control none),
# as in a replayed step, where a cold TLB and L2 would make every small kernel look slow.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [ -n "$NCU" ] || ! selected profile; then
  step profile profile.txt 180 env NCU="$NCU" GROKIT_BIN="$GROKIT_BIN" bash -c '
    for part in decode prefill; do
      echo "### section: $part"
      "$NCU" --clock-control none --cache-control none --print-summary per-kernel \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        "$GROKIT_BIN" bench-device --device cuda --reps 1 --steps 1 --only "$part" || exit
    done' || true
else
  RESULT[profile]="skipped: no ncu (Nsight Compute) here"
fi
exit $FAILED
