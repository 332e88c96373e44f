#!/usr/bin/env bash
# The main job on a built-in default: writes a tiny Grok-1-architecture checkpoint in the
# release encoding (12 layers, 8 experts) and a small tokenizer, converts it to a TP-2
# grokit model, verifies every checksum, validates every tensor against the source
# pickles, checks the logits against the independent NumPy reference, and generates text.
# Usage: scripts/demo.sh [WORK_DIR]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
GROKIT=build/bin/grokit
WORK=${1:-$(mktemp -d -t grokit-demo.XXXXXX)}
mkdir -p "$WORK"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. write a tiny checkpoint in the release encoding, and a small tokenizer"
python3 scripts/make_checkpoint.py "$WORK/checkpoint" --preset tiny --force
python3 scripts/make_tokenizer.py "$WORK/tokenizer" --vocab-size 512 --force
step "2. convert it to a tensor-parallel-2 grokit model"
$GROKIT convert "$WORK/checkpoint/ckpt-0" "$WORK/model" --tp 2 --tokenizer "$WORK/tokenizer.model" --force
step "3. verify every checksum"
$GROKIT verify "$WORK/model"
step "4. validate every stored tensor against the source pickles"
$GROKIT validate tensors "$WORK/checkpoint/ckpt-0" "$WORK/model"
step "5. compare logits with the NumPy reference (scripts/reference.py) on random tokens"
python3 - "$WORK/tokens.npy" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(7)
tokens = rng.integers(3, 512, size=(2, 48)).astype(np.int32)
tokens[1, 40:] = 0  # a right-padded row
np.save(sys.argv[1], tokens)
PY
$GROKIT logits "$WORK/model" --tokens "$WORK/tokens.npy" --out "$WORK/logits.npy" --force
python3 scripts/reference.py "$WORK/checkpoint" --tokens "$WORK/tokens.npy" --out "$WORK/reference.npy"
$GROKIT validate logits --reference "$WORK/reference.npy" --candidate "$WORK/logits.npy" --tokens "$WORK/tokens.npy"
step "6. generate (random weights: the text means nothing, the machinery is real)"
$GROKIT run "$WORK/model" --prompt "The answer to life the universe and everything is of course" \
  --max-tokens 24 --temperature 0.8 --seed 1
cat >&2 <<MSG

Done. In $WORK:
  checkpoint/  a Grok-1-architecture checkpoint in the release's pickle encoding
  model/       the same weights as a grokit model: manifest.json, tokenizer, 2 shard files
The tensors in model/ equal checkpoint/ bit for bit (step 4), and grokit's logits match
the independent reference within the default thresholds (step 5).
MSG
