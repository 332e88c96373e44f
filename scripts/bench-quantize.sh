#!/usr/bin/env bash
# Benchmark: int8 -> int4 requantization of a real-width slice of Grok-1 (emb 6144, ffn
# 32768, 8 experts, 48/8 heads, 1 layer, a small vocabulary: about 4.9 GB of int8 weight
# matrices), against a single-threaded memcpy of the same shard bytes from the same page
# cache, in the same run. Prints GB/s of int8 input and the ratio per core used:
#   (quantize GB/s / threads) / (memcpy GB/s).   Target: >= 0.5.
# Also `cp` of the same file, the pass a converter cannot beat through the page cache, and
# 1 GiB of direct writes, the disk's rate for the shards quantize writes (O_DIRECT).
# The int4 scale search (the default) and plain RTN (--no-search) are both timed, and
# fp8 for comparison, each with the cores it kept busy ((user + system) / wall time); last,
# the kernels alone (one thread, data in cache, no file I/O).
# Output goes to a scratch directory that is removed afterwards.
# Usage: scripts/bench-quantize.sh [WORK_DIR] [THREADS]   (default: build/bench-quantize,
#        every core; needs ~12 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
GROKIT=$PWD/build/bin/grokit
WORK=${1:-$PWD/build/bench-quantize}
THREADS=${2:-$(nproc)}
mkdir -p "$WORK"

if [ ! -f "$WORK/model/manifest.json" ]; then
  echo "writing and converting the real-width slice in $WORK ..." >&2
  python3 scripts/make_checkpoint.py "$WORK/checkpoint" --preset bench-slice --vocab 1024 --force >/dev/null
  rm -rf "$WORK/model"
  "$GROKIT" convert "$WORK/checkpoint/ckpt-0" "$WORK/model" --tp 1 --no-progress
  rm -rf "$WORK/checkpoint"
fi
SHARD=$(ls "$WORK"/model/shard-*.gkt | head -n 1)

# Warm the page cache with the input, then time memcpy of it (the best of 3).
MEMCPY=$(python3 - "$SHARD" <<'PY'
import mmap, sys, time
import numpy as np
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
src = np.frombuffer(m, np.uint8)
dst = np.empty_like(src)
best = 0.0
for _ in range(3):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = max(best, src.size / (time.perf_counter() - t0))
print(f"{best / 1e9:.3f}")
PY
)

# The file system's own limit for a pass that reads the shard and writes a file: `cp` of
# the same bytes (page cache to page cache, best of 2; quantize writes 0.5x (int4) to 1x
# (fp8) of them). Shown beside the memcpy ratio, which is the target's.
CP=$(python3 - "$SHARD" "$WORK/cp-probe" <<'PY'
import os, shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
best = 0.0
for _ in range(2):
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    best = max(best, os.path.getsize(src) / (time.perf_counter() - t0))
    os.remove(dst)
print(f"{best / 1e9:.3f}")
PY
)

# The disk's rate for what quantize writes: 1 GiB in 8 MiB direct (O_DIRECT) writes, as
# its shards are written, then fsync (best of 2; 0 where the file system refuses
# O_DIRECT). int4 writes about half as many bytes as it reads.
DIRECT=$(python3 - "$WORK/direct-probe" <<'PY'
import mmap, os, sys, time
path, chunk, total = sys.argv[1], 8 << 20, 1 << 30
buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
buf.write(os.urandom(chunk))
best = 0.0
for _ in range(2):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        break
    t0 = time.perf_counter()
    try:
        for off in range(0, total, chunk):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        best = max(best, total / (time.perf_counter() - t0))
    except OSError:
        pass
    os.close(fd)
    os.remove(path)
print(f"{best / 1e9:.3f}")
PY
)

run() {  # name, flags... -> "GB/s cores-busy": GB/s of int8 input, parsed from the
          # one-line summary, and (user + system time) / wall time
  local name=$1
  shift
  rm -rf "$WORK/out"
  local TIMEFORMAT="%R %U %S"
  { time "$GROKIT" quantize "$WORK/model" "$WORK/out" --threads "$THREADS" --no-progress "$@" \
      > "$WORK/$name.txt" 2> "$WORK/$name.log"; } 2> "$WORK/$name.time"
  local rate
  rate=$(sed -n 's/.*(\([0-9.]*\) GB\/s of input).*/\1/p' "$WORK/$name.log")
  awk -v r="$rate" '{ printf "%s %.2f\n", r, ($2 + $3) / $1 }' "$WORK/$name.time"
}
read -r SEARCH SEARCH_BUSY < <(run int4-search --scheme int4)
read -r RTN RTN_BUSY < <(run int4-rtn --scheme int4 --no-search)
read -r FP8 FP8_BUSY < <(run fp8 --scheme fp8)
rm -rf "$WORK/out"
tail -n 1 "$WORK/int4-search.log" >&2

# The kernels alone, one thread, on data in cache at the best SIMD level (no file I/O):
# what the pipeline's page-cache reads and writes leave of them.
KERNEL=$(build/bin/test_quantize --gtest_also_run_disabled_tests --gtest_filter='*Throughput*' 2>/dev/null |
  awk '/^memcpy/ {m = $2} /^q4g g128 search/ {s = $5} /^q4g g128 rtn/ {r = $5} /^f8col/ {f = $3}
       END {printf "memcpy %.2f, int4 search %.2f, RTN %.2f, fp8 %.2f GB/s", m, s, r, f}')

awk -v m="$MEMCPY" -v c="$CP" -v d="$DIRECT" -v s="$SEARCH" -v r="$RTN" -v f="$FP8" -v t="$THREADS" -v k="$KERNEL" \
    -v sb="$SEARCH_BUSY" -v rb="$RTN_BUSY" -v fb="$FP8_BUSY" 'BEGIN {
  printf "\nbench-quantize: real-width slice, %d threads\n", t
  printf "  memcpy (1 thread)      : %7.2f GB/s\n", m
  printf "  cp of the same file    : %7.2f GB/s\n", c
  printf "  direct write + fsync   : %7.2f GB/s  (int4 at this rate of output: %.2f GB/s of input)\n", d, 2 * d
  printf "  int4 g128, scale search: %7.2f GB/s  ratio per core %.3f (target >= 0.5), against cp %.2f; cores busy %.2f\n", s, s / t / m, s / c, sb
  printf "  int4 g128, plain RTN   : %7.2f GB/s  ratio per core %.3f, against cp %.2f; cores busy %.2f\n", r, r / t / m, r / c, rb
  printf "  fp8                    : %7.2f GB/s  ratio per core %.3f, against cp %.2f; cores busy %.2f\n", f, f / t / m, f / c, fb
  printf "  kernels alone, 1 thread: %s\n", k
}'
