"""Tests for scripts/reference.py, the NumPy reference forward pass
(run: python3 -m unittest discover -s tests/python)."""
import contextlib
import io
import math
import os
import pickle
import subprocess
import sys
import tempfile
import types
import unittest

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import make_checkpoint as mc  # noqa: E402
import reference as R  # noqa: E402
import reference_mutations  # noqa: E402

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)


def tiny_config(**overrides):
    sizes = dict(mc.PRESETS["tiny"])
    sizes.update(overrides)
    return mc.make_config(**sizes)


def bf16_values(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32).astype(BF16).astype(F32)


def load_variant(source, tag):
    """reference.py's source text (possibly mutated) as a fresh module."""
    mod = types.ModuleType(f"reference_variant_{tag}")
    mod.__file__ = R.__file__
    sys.modules[mod.__name__] = mod  # dataclasses looks the module up
    exec(compile(source, R.__file__, "exec"), mod.__dict__)
    return mod


class Ops(unittest.TestCase):
    def test_bf16_rounds_to_nearest_even(self):
        x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20,
                      1 + 2**-9, 3.0, np.inf, 0.0], F32)
        want = [1.0, 1 + 2**-6, -1.0, 1 + 2**-7, 1.0, 3.0, np.inf, 0.0]
        got = R.bf16(x)
        self.assertEqual(got.dtype, F32)
        self.assertEqual(got.tolist(), want)
        self.assertEqual(float(R.bf16(78.38367176906169)), 78.5)
        self.assertEqual(float(R.bf16(0.5773502691896257)), 0.578125)

    def test_rotate_half(self):
        x = np.array([1, 2, 3, 4, 5, 6], F32)
        self.assertEqual(R.rotate_half(x).tolist(), [-4, -5, -6, 1, 2, 3])

    def test_rope_at_position_3_matches_the_direct_formula(self):
        dh, base = 8, 10000
        x = bf16_values(np.random.default_rng(1), (dh,))
        xs = np.zeros((1, 4, 1, dh), F32)
        xs[0, :, 0] = x
        cos, sin = R.rope_tables(4, dh, base)
        out = R.rope(xs, cos, sin)[0, :, 0]
        self.assertEqual(out[0].tolist(), x.tolist())  # position 0: no rotation
        half, direct = dh // 2, np.zeros(dh)
        for j in range(half):
            theta = 3 * base ** (-2 * j / dh)
            direct[j] = x[j] * math.cos(theta) - x[j + half] * math.sin(theta)
            direct[j + half] = x[j + half] * math.cos(theta) + x[j] * math.sin(theta)
        np.testing.assert_allclose(out[3], direct, rtol=2**-8, atol=1e-6)
        self.assertTrue(np.array_equal(R.bf16(out[3]), out[3]))

    def test_soft_cap(self):
        s = np.array([0, 1, -1, 30, 45, -1e4], F32)
        got = R.soft_cap(s, 30)
        want = (30 * np.tanh(s.astype(np.float64) / 30)).astype(F32)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        self.assertEqual(got[0], 0)
        self.assertEqual(got[5], -30)
        self.assertTrue(np.all(np.abs(got[:5]) < 30))
        self.assertEqual(got.dtype, F32)

    def test_softmax_of_a_fully_masked_row_is_uniform(self):
        p = R.softmax(np.full((1, 5), -1e30, F32))
        self.assertTrue(np.all(p == F32(1) / F32(5)))

    def test_attention_masks_by_hand(self):
        cfg = dict(R.GROK1, attn_output_multiplier=0.5)
        rng = np.random.default_rng(2)
        T, H, KV, dh = 4, 2, 1, 4
        q, k, v = (bf16_values(rng, s) for s in ((T, H, dh), (T, KV, dh), (T, KV, dh)))
        real = np.array([False, True, True, False])  # a pad at position 0, another at 3
        o = R.attend(cfg, q, k, v, real).reshape(T, H, dh)
        for h in range(H):
            # query 0 sees no unmasked key: uniform weights 1/4 over all four keys
            np.testing.assert_array_equal(o[0, h], R.bf16(F32(0.25) * v[:, 0].sum(0)))
            np.testing.assert_array_equal(o[1, h], v[1, 0])  # only key 1: weight 1
            s = R.soft_cap(R.bf16(k[1:3, 0] @ q[3, h]) * F32(0.5), 30)  # keys 1, 2 only
            w = R.bf16(R.softmax(s[None]))[0]
            np.testing.assert_allclose(o[3, h], w @ v[1:3, 0], rtol=2**-7, atol=1e-6)

    def test_router_top2_tie_goes_to_the_lower_expert(self):
        x = np.array([[1, 0], [0, 1]], F32)
        w = np.array([[1, 3, 3, 0], [3, 1, 3, 3]], F32)
        chosen, gates = R.route(x, w, 2)
        self.assertEqual(chosen.tolist(), [[1, 2], [0, 2]])
        e = np.exp(np.array([-2, 0, 0, -3], np.float64)).astype(F32)
        p = e / F32(((e[0] + e[1]) + e[2]) + e[3])
        self.assertEqual(gates[0].tolist(), [p[1], p[2]])  # not renormalized
        self.assertLess(gates[0].sum(), 0.99)

    def test_dequantize_row_blocks(self):
        w = np.array([[1, -2], [127, 3], [4, 5], [-128, 127]], np.int8)
        s = np.array([[1.0078125, 0.5], [2.0, 0.25]], F32).astype(BF16)
        got = R.dequantize(R.QuantizedWeight8bit(w, s))
        # rows 0-1 use block 0, rows 2-3 block 1; 127 * 1.0078125 = 127.99 rounds to 128
        self.assertEqual(got.tolist(), [[1.0078125, -1.0], [128.0, 1.5], [8.0, 1.25],
                                        [-256.0, 31.75]])
        per_col = R.dequantize(R.QuantizedWeight8bit(w, s[:1]))
        self.assertEqual(per_col[:, 1].tolist(), [-1.0, 1.5, 2.5, 63.5])
        experts = R.dequantize(R.QuantizedWeight8bit(np.stack([w, w // 2]), np.stack([s, s])))
        self.assertEqual(experts[1, 2:].tolist(), [[4.0, 0.5], [-128.0, 15.75]])
        with self.assertRaises(ValueError):
            R.dequantize(R.QuantizedWeight8bit(w, np.ones((3, 2), BF16)))

    def test_release_order_is_string_order(self):
        names = R.release_order(12)
        self.assertEqual(len(names), 2 + 12 * 12)
        self.assertEqual(names[:2], [R.EMBED, R.FINAL_NORM])
        layers = [int(n.split("_")[2].split("/")[0]) for n in names[2::12]]
        self.assertEqual(layers, [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9])
        self.assertEqual(names, mc.release_param_names(12))

    def test_unpickler_rejects_other_globals(self):
        with self.assertRaisesRegex(pickle.UnpicklingError, "not allowed"):
            R._Unpickler(io.BytesIO(pickle.dumps(os.getcwd))).load()


class EndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dirs = {}
        for tag, layers, boost in (("l2", 2, 0.0), ("l12", 12, 0.0), ("boost", 2, 4.0)):
            d = os.path.join(cls.tmp.name, tag)
            mc.write_checkpoint(d, tiny_config(layers=layers), seed=7,
                                attn_logit_boost=boost)
            cls.dirs[tag] = d
        cls.config, cls.params = R.load_checkpoint(cls.dirs["l2"])
        rng = np.random.default_rng(3)
        cls.tokens = rng.integers(1, 512, (2, 16)).astype(np.int32)
        cls.tokens[1, 10:] = 0  # row 1: 10 real tokens, right-padded
        cls.hidden = []
        cls.logits = R.forward(cls.config, cls.params, cls.tokens, dump=cls.hidden)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_shapes_and_values(self):
        lg = self.logits
        self.assertEqual(lg.shape, (2, 16, 512))
        self.assertEqual(lg.dtype, F32)
        self.assertTrue(np.all(np.isfinite(lg)))
        np.testing.assert_array_equal(R.bf16(lg), lg)
        self.assertGreater(lg.std(), 0.5)
        self.assertEqual(len(self.hidden), 3)
        for h in self.hidden:
            self.assertEqual(h.shape, (2, 16, 128))
            np.testing.assert_array_equal(R.bf16(h), h)

    def test_rows_are_independent_of_the_batch_and_of_padding(self):
        alone = R.forward(self.config, self.params, self.tokens[:1])
        np.testing.assert_array_equal(alone[0], self.logits[0])
        unpadded = R.forward(self.config, self.params, self.tokens[1:, :10])
        np.testing.assert_array_equal(unpadded[0], self.logits[1, :10])

    def test_config_and_checkpoint_dir_forms(self):
        ckpt0 = os.path.join(self.dirs["l2"], "ckpt-0")
        cfg, params = R.load_checkpoint(ckpt0)  # ckpt-0 itself: config.json one level up
        self.assertEqual(cfg["num_layers"], 2)
        np.testing.assert_array_equal(R.forward(cfg, params, self.tokens), self.logits)
        with self.assertRaisesRegex(ValueError, "layers"):
            R.load_checkpoint(self.dirs["l2"], dict(self.config, num_layers=3))
        with self.assertRaisesRegex(ValueError, "expected"):
            R.load_checkpoint(self.dirs["l2"], dict(self.config, num_kv_heads=4))

    def test_cli(self):
        d = tempfile.mkdtemp(dir=self.tmp.name)
        tok, out, gout = (os.path.join(d, f) for f in ("t.npy", "l.npy", "g.npy"))
        np.save(tok, self.tokens)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = R.main([self.dirs["l2"], "--tokens", tok, "--out", out, "--dump-layers",
                         os.path.join(d, "h"), "--greedy", "3", "--greedy-out", gout])
        self.assertEqual(rc, 0, err.getvalue())
        self.assertIn("max |attention logit|", err.getvalue())
        np.testing.assert_array_equal(np.load(out), self.logits)
        for i, h in enumerate(self.hidden):
            np.testing.assert_array_equal(np.load(os.path.join(d, "h", f"hidden_{i:03d}.npy")), h)
        g = np.load(gout)
        self.assertEqual((g.shape, g.dtype), ((2, 3), np.int32))
        self.assertEqual(g[:, 0].tolist(), [int(np.argmax(self.logits[0, 15])),
                                            int(np.argmax(self.logits[1, 9]))])
        longer = np.concatenate([self.tokens[1, :10], g[1, :2]])[None]
        self.assertEqual(int(np.argmax(R.forward(self.config, self.params, longer)[0, -1])),
                         g[1, 2])

    def test_help_lists_every_flag_with_its_default(self):
        p = subprocess.run([sys.executable, R.__file__, "--help"], capture_output=True,
                           text=True, check=True)
        text = " ".join(p.stdout.split())
        for flag in ("--tokens", "--out", "--dump-layers", "--greedy", "--greedy-out",
                     "--config"):
            self.assertIn(flag, text)
        self.assertIn("(default: 0)", text)
        self.assertGreaterEqual(text.count("(default:"), 6)

    def test_boosted_checkpoints_exceed_the_cap(self):
        cfg, params = R.load_checkpoint(self.dirs["boost"])
        stats = {}
        R.forward(cfg, params, self.tokens, stats=stats)
        self.assertGreater(stats["max_abs_attn_logit"], 30)

    def test_every_mutation_applies_and_changes_the_output(self):
        with open(R.__file__) as f:
            source = f.read()
        tokens = self.tokens[:, :12]

        def run(mod):
            cfg, params = mod.load_checkpoint(self.dirs["l12"])
            hidden = []
            return mod.forward(cfg, params, tokens, dump=hidden), hidden

        base_logits, base_hidden = run(load_variant(source, "base"))
        same_logits, _ = run(R)
        np.testing.assert_array_equal(base_logits, same_logits)
        for name in reference_mutations.MUTATIONS:
            with self.subTest(mutation=name):
                logits, hidden = run(load_variant(reference_mutations.apply(source, name), name))
                changed = not np.array_equal(logits, base_logits) or any(
                    not np.array_equal(a, b) for a, b in zip(hidden, base_hidden))
                self.assertTrue(changed, f"mutation {name} changes nothing")
        with self.assertRaises(AssertionError):
            reference_mutations.apply(source + source, "no_logit_cap")


if __name__ == "__main__":
    unittest.main()
