"""The parity checks of test_runner.py must be sharp enough to catch a wrong forward pass.

Each deliberate mistake of reference_mutations.MUTATIONS is applied to a temporary copy of
scripts/reference.py, and the comparison against grokit must then fail. The comparison is
the one test_runner.py makes:
  - logits: `grokit validate logits --tokens` with its default thresholds (max KL 1e-3,
    top-1 100% outside near ties), and
  - hidden states at TP 1: every hidden_000..hidden_L bf16-identical to grokit's in >= 99%
    of the elements of real positions.
The checkpoint is made with --attn-logit-boost 4, so that some attention logits go far past
the cap of 30 and the cap matters (a plain tiny checkpoint barely reaches it).

On this checkpoint every mutation is caught by both checks (the subtlest, the unrounded
embedding multiplier, already changes a few % of hidden_000, and the random 12 layers
amplify it to most elements), so no op-level check is needed. If a mutation added later is
caught by neither, add a sharper check here (hidden_000 alone, a single-layer checkpoint,
...) and say why in a comment. tearDownClass prints which check caught which mutation.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import ml_dtypes
import numpy as np

from e2e_util import SOURCE_DIR, run, tiny_config, write_checkpoint
from reference_mutations import MUTATIONS, apply

BF16 = np.dtype(ml_dtypes.bfloat16)
REFERENCE_PY = os.path.join(SOURCE_DIR, "scripts", "reference.py")
MIN_IDENTICAL = 0.99


class Sharpness(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-sharp-")
        cls.ck_dir = os.path.join(cls.tmp, "ck")
        cls.config = tiny_config()
        cls.ckpt = write_checkpoint(cls.ck_dir, cls.config, seed=11, attn_logit_boost=4.0)
        model = os.path.join(cls.tmp, "m")
        run("convert", cls.ckpt, model, "--tp", 1, "--no-progress", check=0)
        rng = np.random.default_rng(32)
        cls.tokens = rng.integers(3, cls.config["vocab_size"], size=(2, 32)).astype(np.int32)
        cls.tokens[1, 21:] = 0
        cls.mask = cls.tokens > 0
        cls.tokens_path = os.path.join(cls.tmp, "tokens.npy")
        np.save(cls.tokens_path, cls.tokens)
        # The grokit side runs once.
        cls.logits = os.path.join(cls.tmp, "grokit.npy")
        cls.hidden = os.path.join(cls.tmp, "grokit_hidden")
        run("logits", model, "--tokens", cls.tokens_path, "--out", cls.logits, "--dump-layers",
            cls.hidden, "--no-progress", check=0)
        with open(REFERENCE_PY) as f:
            cls.source = f.read()
        cls.caught = {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if cls.caught:
            print("\nsharpness: " + "; ".join(f"{k}: {v}" for k, v in sorted(cls.caught.items())),
                  file=sys.stderr)

    def compare(self, name, source):
        """Runs `source` (a reference.py) as a script; returns (logits check passed, its
        summary, per-layer bf16-identical fractions, the reference's stderr)."""
        work = os.path.join(self.tmp, name)
        os.makedirs(work, exist_ok=True)
        script = os.path.join(work, "reference.py")
        with open(script, "w") as f:
            f.write(source)
        out, hidden = os.path.join(work, "logits.npy"), os.path.join(work, "hidden")
        p = subprocess.run([sys.executable, script, self.ck_dir, "--tokens", self.tokens_path,
                            "--out", out, "--dump-layers", hidden], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, f"{name}: the reference failed to run\n{p.stderr}")
        v = run("validate", "logits", "--reference", out, "--candidate", self.logits,
                "--tokens", self.tokens_path, "--no-progress")
        self.assertIn(v.returncode, (0, 1), v.stderr)
        fractions = []
        for i in range(self.config["num_layers"] + 1):
            fname = f"hidden_{i:03d}.npy"
            a = np.load(os.path.join(hidden, fname)).astype(BF16)
            b = np.load(os.path.join(self.hidden, fname)).astype(BF16)
            fractions.append(float((a == b)[self.mask].mean()))
        return v.returncode == 0, v.stderr.strip(), fractions, p.stderr

    def test_unmutated_reference_passes_both_checks(self):
        t0 = time.monotonic()
        logits_ok, summary, fractions, log = self.compare("control", self.source)
        self.assertTrue(logits_ok, summary)
        # The boost works: some attention logits lie well past the cap of 30.
        top = float(re.search(r"max \|attention logit\| before the cap ([\d.]+)", log).group(1))
        self.assertGreater(top, 60, log)
        for i, f in enumerate(fractions):
            self.assertGreaterEqual(f, MIN_IDENTICAL, f"hidden_{i:03d}: {fractions}")
        self.caught["control"] = f"passes both ({time.monotonic() - t0:.1f} s)"

    def test_every_mutation_is_caught(self):
        self.assertGreater(len(MUTATIONS), 0)
        for name in sorted(MUTATIONS):
            with self.subTest(mutation=name):
                logits_ok, summary, fractions, _ = self.compare(name, apply(self.source, name))
                hidden_ok = all(f >= MIN_IDENTICAL for f in fractions)
                worst = min(range(len(fractions)), key=fractions.__getitem__)
                by = [w for w, ok in (("logits", logits_ok), ("hidden states", hidden_ok)) if not ok]
                self.caught[name] = (" + ".join(by) if by else "NOTHING") + \
                    f" (lowest bf16-identical: hidden_{worst:03d} {fractions[worst]:.3f})"
                self.assertTrue(by, f"mutation {name} is caught by neither check: {summary}; "
                                    f"bf16-identical per layer {[round(f, 4) for f in fractions]}")


if __name__ == "__main__":
    unittest.main()
