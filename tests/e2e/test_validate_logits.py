"""grokit validate logits: exit codes, and --json numbers against the same metrics computed
here with numpy (KL of the float64 log-softmaxes, top-1 with its near ties, perplexity)."""
import json
import os
import re
import shutil
import tempfile
import unittest

import numpy as np

from e2e_util import run

B, T, V = 2, 16, 300
NEAR_TIE = 0.1


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference_metrics(ref, cand, tokens=None, margin=NEAR_TIE):
    """The report grokit should print, computed independently with numpy."""
    if ref.ndim == 2:
        ref, cand = ref[None], cand[None]
        tokens = None if tokens is None else tokens.reshape(1, -1)
    lr, lc = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    mask = np.ones(kl.shape, bool) if tokens is None else tokens != 0
    top = np.sort(ref.astype(np.float64), axis=-1)
    ref_margin = top[..., -1] - top[..., -2]
    agree = ref.argmax(axis=-1) == cand.argmax(axis=-1)  # numpy's argmax: first index on ties
    decisive = mask & (ref_margin >= margin)
    near = mask & (ref_margin < margin)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64)).max(axis=-1)
    out = {
        "positions": int(mask.sum()),
        "kl_mean": float(kl[mask].mean()), "kl_p99": float(np.percentile(kl[mask], 99)),
        "kl_max": float(kl[mask].max()),
        "decisive": int(decisive.sum()), "decisive_agree": int((agree & decisive).sum()),
        "near": int(near.sum()), "near_agree": int((agree & near).sum()),
        "max_abs_diff": float(diff[mask].max()),
    }
    flat = [(float(kl[b, t]), b, t) for b in range(kl.shape[0]) for t in range(kl.shape[1]) if mask[b, t]]
    flat.sort(key=lambda e: (-e[0], e[1], e[2]))
    out["worst"] = [[b, t, k] for k, b, t in flat[:5]]
    if tokens is not None:
        nll_r, nll_c = [], []
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1] - 1):
                if tokens[b, t] != 0 and tokens[b, t + 1] > 0:
                    nll_r.append(-lr[b, t, tokens[b, t + 1]])
                    nll_c.append(-lc[b, t, tokens[b, t + 1]])
        out["ppl_ref"] = float(np.exp(np.mean(nll_r)))
        out["ppl_cand"] = float(np.exp(np.mean(nll_c)))
        out["predictions"] = len(nll_r)
    return out


class ValidateLogits(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-logits-")
        rng = np.random.default_rng(7)
        ref = (rng.standard_normal((B, T, V)) * 3).astype(np.float32)
        # Position [0, 3]: a clear winner (margin >= 2), to flip in a candidate.
        ref[0, 3, 11] = ref[0, 3].max() + 2.0
        # Position [1, 1]: a near tie between indices 20 and 21.
        ref[1, 1, 20] = ref[1, 1].max() + 1.0
        ref[1, 1, 21] = ref[1, 1, 20] - np.float32(0.03)
        cls.ref = ref
        cls.tokens = rng.integers(1, V, size=(B, T)).astype(np.int32)
        cls.tokens[1, T - 4:] = 0  # padding on the right of row 1
        cls.noisy = (ref + rng.standard_normal(ref.shape).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        flipped = ref.copy()
        flipped[0, 3, 11], flipped[0, 3, 12] = ref[0, 3, 12], ref[0, 3, 11]
        cls.flipped = flipped
        nan = ref.copy()
        nan[1, 2, 5] = np.nan
        cls.nan = nan
        for name in ("ref", "noisy", "flipped", "nan", "tokens"):
            np.save(cls.path(name), getattr(cls, name))
        np.save(cls.path("short"), ref[:, :T - 1])
        np.save(cls.path("ref2d"), ref.reshape(B * T, V))
        np.save(cls.path("noisy2d"), cls.noisy.reshape(B * T, V))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def path(cls, name):
        return os.path.join(cls.tmp, name + ".npy")

    def validate(self, cand, *extra, ref="ref", rc=0):
        return run("validate", "logits", "--reference", self.path(ref), "--candidate", self.path(cand), "--no-progress",
                   *extra, check=rc)

    def check_json(self, j, want, with_tokens):
        close = dict(rtol=1e-6, atol=1e-13)
        self.assertEqual(j["positions"], want["positions"])
        np.testing.assert_allclose(j["kl"]["mean"], want["kl_mean"], **close)
        np.testing.assert_allclose(j["kl"]["p99"], want["kl_p99"], **close)
        np.testing.assert_allclose(j["kl"]["max"], want["kl_max"], **close)
        self.assertEqual(j["top1"]["positions"], want["decisive"])
        self.assertEqual(j["top1"]["agree"], want["decisive_agree"])
        self.assertEqual(j["near_ties"]["positions"], want["near"])
        self.assertEqual(j["near_ties"]["agree"], want["near_agree"])
        self.assertEqual(j["max_abs_diff"], want["max_abs_diff"])  # exact: |a - b| of two float32 in float64
        self.assertEqual([w[:2] for w in j["worst_positions"]], [w[:2] for w in want["worst"]])
        np.testing.assert_allclose([w[2] for w in j["worst_positions"]], [w[2] for w in want["worst"]], **close)
        if with_tokens:
            p = j["perplexity"]
            self.assertEqual(p["predictions"], want["predictions"])
            np.testing.assert_allclose(p["reference"], want["ppl_ref"], rtol=1e-9)
            np.testing.assert_allclose(p["candidate"], want["ppl_cand"], rtol=1e-9)
            np.testing.assert_allclose(p["ratio"], want["ppl_cand"] / want["ppl_ref"], rtol=1e-9)
        else:
            self.assertIsNone(j["perplexity"])

    def test_identical_passes_with_zero_kl(self):
        p = self.validate("ref", "--json")
        j = json.loads(p.stdout)
        self.assertTrue(j["ok"])
        self.assertEqual(j["kl"], {"mean": 0.0, "p99": 0.0, "max": 0.0})
        self.assertEqual(j["top1"]["agreement"], 1.0)
        self.assertEqual(j["near_ties"]["agreement"], 1.0)
        self.assertEqual(j["max_abs_diff"], 0.0)
        self.assertEqual(j["positions"], B * T)
        self.assertRegex(p.stderr, r"^validate logits: OK: 32 positions")
        self.assertEqual(len(p.stderr.strip().splitlines()), 1)

    def test_tiny_noise_passes_and_agrees_with_numpy(self):
        p = self.validate("noisy", "--json", "--tokens", self.path("tokens"), "--max-ppl-ratio", "0.01",
                          "--max-mean-kl", "1e-4", "--max-p99-kl", "1e-3", "--max-abs-diff", "0.01")
        j = json.loads(p.stdout)
        self.assertTrue(j["ok"], p.stdout)
        want = reference_metrics(self.ref, self.noisy, self.tokens)
        self.assertEqual(j["padding_skipped"], 4)
        self.assertGreater(want["near"], 0)  # position [1, 1] at least
        self.check_json(j, want, with_tokens=True)
        names = [c["name"] for c in j["checks"]]
        self.assertEqual(names, ["max_kl", "min_top1", "max_mean_kl", "max_p99_kl", "max_abs_diff", "max_ppl_ratio"])
        self.assertTrue(all(c["pass"] for c in j["checks"]))
        self.assertEqual(j["thresholds"]["max_kl"], 1e-3)
        self.assertEqual(j["thresholds"]["near_tie_margin"], NEAR_TIE)

    def test_same_numbers_without_tokens_and_for_2d(self):
        want = reference_metrics(self.ref, self.noisy)
        self.check_json(json.loads(self.validate("noisy", "--json").stdout), want, with_tokens=False)
        j2 = json.loads(self.validate("noisy2d", "--json", ref="ref2d", rc=0).stdout)
        want2 = reference_metrics(self.ref.reshape(B * T, V), self.noisy.reshape(B * T, V))
        self.check_json(j2, want2, with_tokens=False)
        self.assertEqual(j2["shape"], [B * T, V])

    def test_thread_count_does_not_change_the_numbers(self):
        outs = []
        for threads in ("1", "3"):
            j = json.loads(self.validate("noisy", "--json", "--tokens", self.path("tokens"), "--threads", threads).stdout)
            j.pop("seconds")
            outs.append(j)
        self.assertEqual(outs[0], outs[1])

    def test_flipped_top1_outside_near_tie_fails(self):
        p = self.validate("flipped", "--json", "--max-kl", "100", rc=1)
        j = json.loads(p.stdout)
        self.assertFalse(j["ok"])
        want = reference_metrics(self.ref, self.flipped)
        self.check_json(j, want, with_tokens=False)
        self.assertEqual(j["top1"]["agree"], j["top1"]["positions"] - 1)
        checks = {c["name"]: c for c in j["checks"]}
        self.assertTrue(checks["max_kl"]["pass"])
        self.assertFalse(checks["min_top1"]["pass"])
        self.assertEqual(j["worst_positions"][0][:2], [0, 3])
        self.assertRegex(p.stderr, r"^validate logits: FAILED")
        # The human table says which check failed.
        t = self.validate("flipped", "--max-kl", "100", rc=1).stdout
        self.assertRegex(t, r"top-1 agreement.*FAIL")
        self.assertRegex(t, r"max KL.*PASS")
        # A lower bound lets it through.
        self.validate("flipped", "--max-kl", "100", "--min-top1", "0.9", rc=0)

    def test_nan_fails_naming_the_position(self):
        p = self.validate("nan", rc=1)
        self.assertIn("nan.npy", p.stderr)
        self.assertIn("position [1, 2]", p.stderr)
        self.assertIn("vocabulary index 5", p.stderr)
        p = self.validate("ref", ref="nan", rc=1)
        self.assertIn("position [1, 2]", p.stderr)

    def test_shape_mismatch_fails(self):
        p = self.validate("short", rc=1)
        self.assertIn(f"reference [{B}, {T}, {V}] / candidate [{B}, {T - 1}, {V}]", p.stderr)

    def test_text_table_lists_every_metric(self):
        p = self.validate("noisy", "--tokens", self.path("tokens"))
        for metric in ("positions compared", "padding positions skipped", "mean KL", "p99 KL", "max KL",
                       "top-1 agreement", "near-tie top-1 agreement", "max |delta logit|", "perplexity reference",
                       "perplexity candidate", "perplexity ratio"):
            self.assertIn(metric, p.stdout)
        self.assertRegex(p.stdout, r"max KL\s+\S+\s+<= 0.001\s+PASS")

    def test_help_lists_every_flag_with_default(self):
        p = run("validate", "logits", "--help", check=0)
        blocks = []
        for line in p.stdout.splitlines():
            if re.match(r"^\s+(-\w, )?--[a-z]", line):
                blocks.append(line)
            elif blocks and line.startswith("          "):
                blocks[-1] += " " + line.strip()
        self.assertGreater(len(blocks), 10)
        for block in blocks:
            if "--help" not in block:
                self.assertIn("default:", block, block)
        self.assertIn("logits", run("validate", "--help", check=0).stdout)

    def test_bad_arguments_exit_2_with_usage(self):
        ref, cand = self.path("ref"), self.path("noisy")
        cases = [
            [],
            ["--reference", ref],
            ["--candidate", cand],
            ["--reference", ref, "--candidate", cand, "--max-kl", "-1"],
            ["--reference", ref, "--candidate", cand, "--max-kl", "abc"],
            ["--reference", ref, "--candidate", cand, "--min-top1", "1.5"],
            ["--reference", ref, "--candidate", cand, "--near-tie-margin", "-0.1"],
            ["--reference", ref, "--candidate", cand, "--max-abs-diff", "nan"],
            ["--reference", ref, "--candidate", cand, "--max-ppl-ratio", "0.1"],
            ["--reference", ref, "--candidate", cand, "--threads", "0"],
            ["--reference", ref, "--candidate", cand, "--bogus"],
            ["--reference", ref, "--candidate", cand, "extra"],
        ]
        for args in cases:
            p = run("validate", "logits", *args)
            self.assertEqual(p.returncode, 2, f"{args}: {p.stderr}")
            self.assertIn("Usage:", p.stderr, str(args))
        p = run("validate", "logitz")
        self.assertEqual(p.returncode, 2)
        self.assertIn("logits", p.stderr)


if __name__ == "__main__":
    unittest.main()
