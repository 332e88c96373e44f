#!/usr/bin/env bash
# Benchmark: CPU decode, one token at a time, on a model larger than the caches (emb 1024,
# 8 experts (2 active), 4 layers, vocab 131072: about 400 MiB of weights read per token,
# the output projection included). Prints tokens/s and the roofline ratio =
# (weight bytes read per token / memory read bandwidth measured in the same run) / step
# time. The bandwidth is measured on the weights' own pages (the memory-mapped shard file,
# like `cp` of the same bytes); a fresh buffer's is printed beside. The run alternates
# the probes and 32 decode steps, 5 rounds, and each round's ratio uses its own probe
# (a shared host's bandwidth drifts by 1.6x within seconds); the headline is the median
# of the rounds. Target: >= 0.7.
# Usage: scripts/bench-cpu.sh [WORK_DIR] [grokit bench flags...]   (default: build/bench-cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
GROKIT=$PWD/build/bin/grokit
WORK=${1:-$PWD/build/bench-cpu}
shift || true
mkdir -p "$WORK"
if [ ! -f "$WORK/model/manifest.json" ]; then
  echo "writing and converting the benchmark model in $WORK ..." >&2
  python3 scripts/make_checkpoint.py "$WORK/checkpoint" --vocab 131072 --emb 1024 --layers 4 --q-heads 8 \
    --kv-heads 8 --key-size 128 --experts 8 --selected 2 --widening-factor 8 --force >/dev/null
  rm -rf "$WORK/model"
  "$GROKIT" convert "$WORK/checkpoint/ckpt-0" "$WORK/model" --tp 1 --no-progress
fi
"$GROKIT" bench "$WORK/model" --steps 32 "$@"
