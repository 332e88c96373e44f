#!/usr/bin/env bash
# Installs everything grokit needs to build, test and run its helper scripts.
# Idempotent: when everything is present it checks and exits in about a second.
set -euo pipefail

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang libclang-rt-14-dev          # libFuzzer and sanitizers
  libgtest-dev libgmock-dev
  libzstd-dev libxxhash-dev nlohmann-json3-dev libcxxopts-dev
  libsentencepiece-dev sentencepiece
  libzmq3-dev cppzmq-dev libxtensor-dev
  python3 python3-pip python3-venv
  util-linux                        # prlimit
)
# Pinned so that the pickles Python writes match the release encoding byte for byte
# (numpy 1.x names numpy.core.multiarray, as the release does).
PY_PACKAGES=("numpy==1.26.4" "ml_dtypes==0.4.1")

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: apt packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" - "${PY_PACKAGES[@]}" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
PYEOF
then
  echo "install-deps: python packages: ${PY_PACKAGES[*]}" >&2
  "$PY" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}" 2>/dev/null ||
    "$PY" -m pip install -q --disable-pip-version-check --break-system-packages "${PY_PACKAGES[@]}"
fi
echo "install-deps: ok" >&2
