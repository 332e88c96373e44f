#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) and runs each on a corpus seeded
# with generated files: pickles of a small checkpoint, its converted shards, manifests,
# .npy files of the dtypes and versions grokit reads.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 600; CI runs 20)
# Crashes are written to build-fuzz/crashes/<target>/ and make the script fail.
# GROKIT_SEED_CONVERTER: a grokit binary already built (CI passes build/bin/grokit) to
# convert the seeds with; otherwise grokit is built here too, instrumented.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-600}
B=${GROKIT_FUZZ_BUILD_DIR:-build-fuzz}
if [ ! -f "$B/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$B" -G Ninja -DGROKIT_FUZZ=ON -DGROKIT_CUDA=OFF \
    -DGROKIT_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
CONVERTER=${GROKIT_SEED_CONVERTER:-}
if [ -z "$CONVERTER" ]; then
  cmake --build "$B" -j "$(nproc)" --target fuzz_pickle fuzz_shard fuzz_manifest fuzz_npy grokit >/dev/null
  CONVERTER=$B/bin/grokit
else
  cmake --build "$B" -j "$(nproc)" --target fuzz_pickle fuzz_shard fuzz_manifest fuzz_npy >/dev/null
fi

# Seeds: a small checkpoint, converted at TP 1 and 2.
SEEDS=$B/seeds
if [ ! -d "$SEEDS/npy" ]; then
  rm -rf "$SEEDS"
  mkdir -p "$SEEDS"/{pickle,shard,manifest,npy}
  python3 scripts/make_checkpoint.py "$SEEDS/ck" --vocab 32 --emb 16 --layers 1 --q-heads 2 \
    --kv-heads 2 --key-size 8 --experts 2 --selected 1 --widening-factor 6 --force >/dev/null 2>&1
  for tp in 1 2; do
    "$CONVERTER" convert "$SEEDS/ck/ckpt-0" "$SEEDS/m$tp" --tp $tp --no-progress 2>/dev/null
    cp "$SEEDS/m$tp/manifest.json" "$SEEDS/manifest/tp$tp.json"
    for f in "$SEEDS/m$tp"/shard-*.gkt; do cp "$f" "$SEEDS/shard/tp$tp-$(basename "$f")"; done
  done
  cp "$SEEDS/ck/config.json" "$SEEDS/manifest/config.json"
  python3 tests/e2e/attacks.py "$SEEDS/pickle" >/dev/null  # the hand-made attacks
  for f in "$SEEDS/ck/ckpt-0"/tensor*; do cp "$f" "$SEEDS/pickle/"; done
  python3 - "$SEEDS/pickle" <<'PY'
import pickle, sys, numpy as np
out = sys.argv[1]
for proto in (2, 3, 5):
    with open(f"{out}/proto{proto}.pkl", "wb") as f:
        pickle.dump(np.arange(12, dtype=np.float32).reshape(3, 4), f, protocol=proto)
PY
  python3 - "$SEEDS/npy" <<'PY'
import sys, numpy as np
out = sys.argv[1]
arrays = {
    "tokens": np.array([[5, 9, 3, 0], [7, 1, 0, 0]], dtype=np.int32),
    "logits": np.linspace(-3, 3, 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5),
    "i8": np.arange(-4, 4, dtype=np.int8), "u8": np.arange(8, dtype=np.uint8),
    "u2": np.arange(6, dtype=np.uint16).reshape(2, 3), "i8wide": np.arange(3, dtype=np.int64),
    "scalar": np.array(1.5, dtype=np.float32), "empty": np.zeros((0, 4), dtype=np.int32),
}
for name, a in arrays.items():
    np.save(f"{out}/{name}.npy", a)
with open(f"{out}/v2.npy", "wb") as f:
    np.lib.format.write_array(f, arrays["tokens"], version=(2, 0))
PY
fi

status=0
for t in pickle shard manifest npy; do
  mkdir -p "$B/corpus/$t" "$B/crashes/$t"
  echo "fuzz_$t: ${SECONDS_PER_TARGET}s" >&2
  if ! "$B/bin/fuzz_$t" "$B/corpus/$t" "$SEEDS/$t" -max_total_time="$SECONDS_PER_TARGET" \
      -max_len=262144 -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$B/crashes/$t/" \
      -print_final_stats=1 2> "$B/fuzz_$t.log"; then
    echo "fuzz_$t: FAILED (see $B/fuzz_$t.log and $B/crashes/$t/)" >&2
    tail -n 30 "$B/fuzz_$t.log" >&2
    status=1
  else
    grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$B/fuzz_$t.log" | tr '\n' ' ' >&2
    echo >&2
  fi
done
exit $status
