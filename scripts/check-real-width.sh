#!/usr/bin/env bash
# A check at Grok-1's real sizes, by hand (not in CI: ~5 minutes and ~22 GB of disk on a
# 2-core host): one decoder layer at full width (emb 6144, ffn 32768, 8 experts, 48/8
# heads) with the full 131072-token vocabulary, so the embedding (3.2 GB of fp32 in the
# release), every expert stack (1.6 GB of int8 codes) and the logits have the sizes of the
# 318 GB model. The tests use tiny models; this runs the same code paths where offsets and
# sizes pass 2^31 bytes. Every step must hold exactly:
#   - convert, verify, `validate tensors` against the pickles (bit for bit);
#   - logits of the CPU engine at TP 1 = TP 8 (resharded by quantize) = the device engine
#     on the CPU twins (`--device host`), and the bf16 scheme = int8: max |delta logit| 0;
#   - int4 at TP 1 = int4 at TP 8 (bytes of the quantize report's tensors and logits);
#   - greedy text at TP 1 = TP 8.
# Prints the int4 and fp8 logits' KL against int8 for the record. Exit status 0 only if
# every check holds.
# Usage: scripts/check-real-width.sh [WORK_DIR]   (default: build/check-real-width; it is
#        emptied first and removed at the end unless KEEP=1)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh >/dev/null
GROKIT=$PWD/build/bin/grokit
WORK=${1:-$PWD/build/check-real-width}
rm -rf "$WORK"
mkdir -p "$WORK"
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
FAILED=0
step() { printf '\n== %s\n' "$*" >&2; }
check() {  # name, command...: runs it, records a failure without stopping
  local name=$1
  shift
  if "$@" > "$WORK/check.log" 2>&1; then
    printf 'PASS  %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    tail -n 20 "$WORK/check.log" >&2
    FAILED=1
  fi
}
same_logits() {  # reference candidate: equal to the bit (max |delta logit| 0)
  "$GROKIT" validate logits --reference "$WORK/$1.npy" --candidate "$WORK/$2.npy" --tokens "$WORK/tokens.npy" \
    --max-abs-diff 0 --no-progress
}
logits() {  # model out [flags...]
  local model=$1 out=$2
  shift 2
  "$GROKIT" logits "$WORK/$model" --tokens "$WORK/tokens.npy" --out "$WORK/$out.npy" --no-progress --no-verify "$@" \
    2>&1 | tail -n 1 >&2
}

step "write the slice in the release encoding (1 layer, real width, vocab 131072; ~8 GB)"
python3 scripts/make_checkpoint.py "$WORK/checkpoint" --preset bench-slice --force 2>&1 | tail -n 1 >&2
TOKENIZER=../shared/grok-1/tokenizer.model
if [ ! -f "$TOKENIZER" ]; then
  python3 scripts/make_tokenizer.py "$WORK/tokenizer" --vocab-size 4096 --force >/dev/null
  TOKENIZER=$WORK/tokenizer.model
fi

step "convert, verify, validate tensors"
"$GROKIT" convert "$WORK/checkpoint/ckpt-0" "$WORK/int8" --tp 1 --tokenizer "$TOKENIZER" --no-progress 2>&1 |
  tail -n 1 >&2
check "verify (TP 1)" "$GROKIT" verify "$WORK/int8"
check "validate tensors against the pickles" "$GROKIT" validate tensors "$WORK/checkpoint/ckpt-0" "$WORK/int8" --no-progress
rm -rf "$WORK/checkpoint"

# Two prompts of 40 and 30 tokens (the second padded), ids across the whole vocabulary.
python3 - "$WORK/tokens.npy" <<'PY'
import sys
import numpy as np
t = np.random.default_rng(5).integers(1, 131072, size=(2, 40)).astype(np.int32)
t[1, 30:] = 0
np.save(sys.argv[1], t)
PY

step "int8 logits: CPU TP 1, CPU TP 8, device engine on the CPU twins"
logits int8 int8
"$GROKIT" quantize "$WORK/int8" "$WORK/int8-tp8" --scheme int8 --tp 8 --no-progress 2>&1 >/dev/null | tail -n 1 >&2
check "verify (TP 8)" "$GROKIT" verify "$WORK/int8-tp8"
logits int8-tp8 int8-tp8
check "logits: TP 8 = TP 1" same_logits int8 int8-tp8
logits int8 int8-host --device host
check "logits: device engine (host) = CPU engine" same_logits int8 int8-host
PROMPT="The quick brown fox jumps over the lazy dog."
"$GROKIT" run "$WORK/int8" --prompt "$PROMPT" --max-tokens 8 --temperature 0 --no-progress --no-verify \
  > "$WORK/text-tp1.txt" 2>/dev/null
"$GROKIT" run "$WORK/int8-tp8" --prompt "$PROMPT" --max-tokens 8 --temperature 0 --no-progress --no-verify \
  > "$WORK/text-tp8.txt" 2>/dev/null
check "greedy text: TP 8 = TP 1" cmp "$WORK/text-tp1.txt" "$WORK/text-tp8.txt"
rm -rf "$WORK/int8-tp8"

step "bf16 scheme"
"$GROKIT" quantize "$WORK/int8" "$WORK/bf16" --scheme bf16 --no-progress 2>&1 >/dev/null | tail -n 1 >&2
check "verify (bf16)" "$GROKIT" verify "$WORK/bf16"
logits bf16 bf16
check "logits: bf16 = int8" same_logits int8 bf16
rm -rf "$WORK/bf16"

step "int4 scheme at TP 1 and TP 8, fp8"
"$GROKIT" quantize "$WORK/int8" "$WORK/int4" --scheme int4 --json --no-progress > "$WORK/int4.json" 2>/dev/null
"$GROKIT" quantize "$WORK/int8" "$WORK/int4-tp8" --scheme int4 --tp 8 --json --no-progress > "$WORK/int4-tp8.json" \
  2>/dev/null
# The reports agree tensor for tensor on everything but the sizes of the shards' slices:
# counts exactly, the error sums to 1e-12 (each rank's share is summed apart, then added).
check "int4 report: TP 8 = TP 1" python3 - "$WORK/int4.json" "$WORK/int4-tp8.json" <<'PY'
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
def same(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x if k != "bytes_out")
    if isinstance(x, list):
        return len(x) == len(y) and all(map(same, x, y))
    if isinstance(x, float) or isinstance(y, float):
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        return num(x) and num(y) and math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300)
    return x == y
sys.exit(0 if same(a["tensors"], b["tensors"]) else 1)
PY
logits int4 int4
logits int4-tp8 int4-tp8
check "int4 logits: TP 8 = TP 1" same_logits int4 int4-tp8
rm -rf "$WORK/int4-tp8"
"$GROKIT" quantize "$WORK/int8" "$WORK/fp8" --scheme fp8 --no-progress 2>/dev/null >/dev/null
logits fp8 fp8
rm -rf "$WORK/fp8"
for s in fp8 int4; do
  printf '%-5s against int8: ' "$s"
  "$GROKIT" validate logits --reference "$WORK/int8.npy" --candidate "$WORK/$s.npy" --tokens "$WORK/tokens.npy" \
    --max-kl 1e9 --min-top1 0 --json --no-progress 2>/dev/null |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print("KL", r["kl"], "top-1", r["top1"]["agreement"])'
done

[ "$FAILED" = 0 ] && echo "check-real-width: every check passed" || echo "check-real-width: FAILED"
exit "$FAILED"
