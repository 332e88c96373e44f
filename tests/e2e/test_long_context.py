"""A full 8192-token context (tiny width, 2 layers) against scripts/reference.py, and the
sequence_len limit of grokit run and grokit logits. Apart from test_runner.py so that
ctest runs the two side by side (the reference's 8192 positions take about a minute)."""
import json
import os
import shutil
import tempfile
import unittest

import numpy as np

from e2e_util import run, tiny_config, write_checkpoint
from test_runner import REFERENCE_PY, python


class LongContext(unittest.TestCase):
    """A full 8192-token context at tiny width (2 layers)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-long-")
        cls.ck_dir = os.path.join(cls.tmp, "ck")
        cfg = tiny_config(layers=2)
        assert cfg["sequence_len"] == 8192, cfg
        cls.ckpt = write_checkpoint(cls.ck_dir, cfg, seed=5)
        cls.model = os.path.join(cls.tmp, "m")
        run("convert", cls.ckpt, cls.model, "--tp", 1, "--no-progress", check=0)
        rng = np.random.default_rng(8192)
        cls.tokens = rng.integers(3, 512, size=(1, 8192)).astype(np.int32)
        cls.tokens_path = os.path.join(cls.tmp, "tokens.npy")
        np.save(cls.tokens_path, cls.tokens)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_8192_positions_match_the_reference(self):
        ref, got = os.path.join(self.tmp, "ref.npy"), os.path.join(self.tmp, "got.npy")
        python(REFERENCE_PY, self.ck_dir, "--tokens", self.tokens_path, "--out", ref)
        run("logits", self.model, "--tokens", self.tokens_path, "--out", got, "--no-progress", check=0)
        self.assertEqual(np.load(got, mmap_mode="r").shape, (1, 8192, 512))
        p = run("validate", "logits", "--reference", ref, "--candidate", got, "--tokens",
                self.tokens_path, "--json", "--no-progress")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(json.loads(p.stdout)["positions"], 8192)

    def test_run_refuses_more_than_sequence_len(self):
        prompt = os.path.join(self.tmp, "prompt8190.npy")
        np.save(prompt, self.tokens[:, :8190])
        out = os.path.join(self.tmp, "ids.npy")
        p = run("run", self.model, "--tokens-in", prompt, "--max-tokens", 8, "--temperature", 0,
                "--tokens-out", out, "--no-progress")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("sequence_len", p.stderr)
        self.assertIn("8192", p.stderr)
        self.assertIn("8198", p.stderr)  # 8190 + 8: the message says how far over it is
        self.assertNotIn("of weights", p.stderr)  # refused before the weights load
        self.assertEqual(p.stdout, "")
        self.assertFalse(os.path.exists(out))

    def test_run_allows_exactly_sequence_len(self):
        """The boundary, on a copy of the model with sequence_len 64 (cheap to fill): 60 + 4
        positions run, 60 + 5 are refused; grokit logits takes 64 tokens, not 65."""
        d = os.path.join(self.tmp, "short")
        ckpt = write_checkpoint(d, tiny_config(layers=2, seq_len=64), seed=5)
        model = os.path.join(self.tmp, "m-short")
        run("convert", ckpt, model, "--tp", 2, "--no-progress", check=0)
        prompt = os.path.join(self.tmp, "prompt60.npy")
        np.save(prompt, self.tokens[:, :60])
        out = os.path.join(self.tmp, "ids60.npy")
        run("run", model, "--tokens-in", prompt, "--max-tokens", 4, "--temperature", 0, "--ignore-eos",
            "--tokens-out", out, "--no-progress", check=0)
        self.assertEqual(np.load(out).shape, (1, 4))
        p = run("run", model, "--tokens-in", prompt, "--max-tokens", 5, "--temperature", 0, "--no-progress")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("sequence_len of 64", p.stderr)
        for T, rc in ((64, 0), (65, 1)):
            toks = os.path.join(self.tmp, f"t{T}.npy")
            np.save(toks, self.tokens[:, :T])
            p = run("logits", model, "--tokens", toks, "--out", os.path.join(self.tmp, f"l{T}.npy"),
                    "--no-progress")
            self.assertEqual(p.returncode, rc, p.stderr)
            if rc:
                self.assertIn("65 positions, more than the model's sequence_len of 64", p.stderr)
                self.assertNotIn("of weights", p.stderr)


if __name__ == "__main__":
    unittest.main()
