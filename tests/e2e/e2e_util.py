"""Shared helpers for the end-to-end tests: where the binary and the scripts are, and
checkpoints written with scripts/make_checkpoint.py."""
import os
import subprocess
import sys

SOURCE_DIR = os.environ.get("GROKIT_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
GROKIT = os.environ.get("GROKIT_BIN") or os.path.join(SOURCE_DIR, "build", "bin", "grokit")
sys.path.insert(0, os.path.join(SOURCE_DIR, "scripts"))

import make_checkpoint  # noqa: E402


# A grokit call that hangs fails its test instead of holding the whole run (seconds;
# GROKIT_TEST_TIMEOUT overrides).
TIMEOUT = float(os.environ.get("GROKIT_TEST_TIMEOUT", "600"))


def run(*args, check=None, **kw):
    """Runs grokit with args; returns the CompletedProcess (text). check=0 asserts rc 0."""
    kw.setdefault("timeout", TIMEOUT)
    p = subprocess.run([GROKIT, *map(str, args)], capture_output=True, text=True, **kw)
    if check is not None and p.returncode != check:
        raise AssertionError(f"grokit {' '.join(map(str, args))}: rc {p.returncode} != {check}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def tiny_config(**overrides):
    sizes = dict(make_checkpoint.PRESETS["tiny"])
    sizes.update(overrides)
    return make_checkpoint.make_config(**sizes)


def write_checkpoint(out_dir, config=None, seed=0, sparse=False, **kw):
    """Writes a checkpoint; returns its ckpt-0 directory."""
    make_checkpoint.write_checkpoint(out_dir, config or tiny_config(), seed=seed, force=True,
                                     sparse=sparse, **kw)
    return os.path.join(out_dir, "ckpt-0")


def files_of(directory):
    """{relative path: bytes} of every file below directory."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out
