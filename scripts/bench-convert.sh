#!/usr/bin/env bash
# Benchmark: convert a real-width slice of Grok-1 (emb 6144, ffn 32768, 8 experts,
# 48/8 heads, vocab 131072, 1 layer: about 8 GB) at TP 8, against `cp --reflink=never`
# of the same input to the same disk, in the same run and the same (cold) cache state,
# both ending with fsync. Prints the throughput ratio and the peak RssAnon.
# Target: ratio >= 0.85, RssAnon < 2 GB.
# Usage: scripts/bench-convert.sh [WORK_DIR]   (default: build/bench-convert; needs ~24 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
GROKIT=$PWD/build/bin/grokit
WORK=${1:-$PWD/build/bench-convert}
SRC=$WORK/slice
mkdir -p "$WORK"

if [ ! -f "$SRC/config.json" ]; then
  echo "writing the real-width slice (about 8 GB) to $SRC ..." >&2
  python3 scripts/make_checkpoint.py "$SRC" --preset bench-slice --force
fi
BYTES=$(du -sb "$SRC/ckpt-0" | cut -f1)

# Drop the source's pages from the page cache (no root needed for clean pages).
evict() {
  python3 - "$@" <<'PY'
import os, sys
for root in sys.argv[1:]:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
PY
}
now() { date +%s.%N; }

rm -rf "$WORK/cp" "$WORK/model"
sync
evict "$SRC"
t0=$(now)
cp -r --reflink=never "$SRC/ckpt-0" "$WORK/cp"
sync "$WORK"/cp/*   # fsync each copied file
t1=$(now)
CP_S=$(awk -v a="$t0" -v b="$t1" "BEGIN{print b-a}")
rm -rf "$WORK/cp"
sync

evict "$SRC"
LOG=$WORK/convert.log
t0=$(now)
"$GROKIT" convert "$SRC/ckpt-0" "$WORK/model" --tp 8 --no-progress 2> "$LOG" &
PID=$!
PEAK=0
while kill -0 $PID 2>/dev/null; do
  v=$(awk '/^RssAnon:/ {print $2}' /proc/$PID/status 2>/dev/null || echo 0)
  [ -n "$v" ] && [ "$v" -gt "$PEAK" ] && PEAK=$v
  sleep 0.05
done
wait $PID || { cat "$LOG" >&2; exit 1; }
t1=$(now)
CONV_S=$(awk -v a="$t0" -v b="$t1" "BEGIN{print b-a}")
OUT_BYTES=$(du -sb "$WORK/model" | cut -f1)
tail -n 1 "$LOG" >&2
"$GROKIT" validate tensors "$SRC/ckpt-0" "$WORK/model" --no-progress 2>&1 | tail -n 1 >&2

awk -v b="$BYTES" -v ob="$OUT_BYTES" -v cp="$CP_S" -v cv="$CONV_S" -v peak="$PEAK" 'BEGIN {
  printf "\nbench-convert: %.2f GB source, TP 8 (%.2f GB written)\n", b / 1e9, ob / 1e9
  printf "  cp --reflink=never + fsync : %7.2f s  %6.2f GB/s\n", cp, b / cp / 1e9
  printf "  grokit convert + fsync     : %7.2f s  %6.2f GB/s of source\n", cv, b / cv / 1e9
  printf "  ratio convert/cp           : %7.2f   (target >= 0.85)\n", cp / cv
  printf "  peak RssAnon               : %7.1f MiB (target < 2048)\n", peak / 1024
}'
rm -rf "$WORK/model"
