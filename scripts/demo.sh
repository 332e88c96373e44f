#!/usr/bin/env bash
# The main job on a built-in default: writes a tiny Grok-1-architecture checkpoint in
# the release encoding, converts it to a TP-2 grokit model, verifies every checksum,
# validates every tensor against the source pickles, and describes the result.
# Usage: scripts/demo.sh [WORK_DIR]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
GROKIT=build/bin/grokit
WORK=${1:-$(mktemp -d -t grokit-demo.XXXXXX)}
mkdir -p "$WORK"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. write a tiny checkpoint in the release encoding (12 layers, 8 experts)"
python3 scripts/make_checkpoint.py "$WORK/checkpoint" --preset tiny --force
step "2. convert it to a tensor-parallel-2 grokit model"
$GROKIT convert "$WORK/checkpoint/ckpt-0" "$WORK/model" --tp 2 --force
step "3. verify every checksum"
$GROKIT verify "$WORK/model"
step "4. validate every stored tensor against the source pickles"
$GROKIT validate tensors "$WORK/checkpoint/ckpt-0" "$WORK/model"
step "5. describe the model"
$GROKIT inspect "$WORK/model" | head -n 24
cat >&2 <<MSG

Done. In $WORK:
  checkpoint/  a Grok-1-architecture checkpoint in the release's pickle encoding
  model/       the same weights as a grokit model: manifest.json and 2 shard files
The tensors in model/ were checked bit for bit against checkpoint/ (step 4).
MSG
