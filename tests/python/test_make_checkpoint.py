"""Tests for scripts/make_checkpoint.py (run: python3 -m unittest discover -s tests/python)."""
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import unittest

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import make_checkpoint as mc  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass
class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray


# As the official checkpoint.py does: the class must be findable as __main__.QuantizedWeight8bit.
QuantizedWeight8bit.__module__ = "__main__"
sys.modules["__main__"].QuantizedWeight8bit = QuantizedWeight8bit

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} not allowed") from None


def load(path):
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


def quiet_main(argv, out=None):
    out = out or io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(out):
        return mc.main(argv)


def written(fn, *args, **kw):
    buf = io.BytesIO()
    fn(buf, *args, **kw)
    return buf.getvalue()


def rand(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.int8:
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    return rng.standard_normal(shape).astype(dtype)


class EncodingTest(unittest.TestCase):
    """The writer's bytes equal pickle.dumps(obj, protocol=4) (the C pickler)."""

    def check_array(self, a):
        want = pickle.dumps(a, protocol=4)
        for chunk in (mc.DEFAULT_CHUNK_BYTES, 1000, 4093):
            self.assertEqual(written(mc.write_array, a, chunk_bytes=chunk), want,
                             f"{a.dtype} {a.shape} chunk {chunk}")

    def check_quantized(self, w, s):
        want = pickle.dumps(QuantizedWeight8bit(w, s), protocol=4)
        for chunk in (mc.DEFAULT_CHUNK_BYTES, 999):
            self.assertEqual(written(mc.write_quantized, w, s, chunk_bytes=chunk), want,
                             f"weight {w.shape} scales {s.shape} chunk {chunk}")

    def test_f32_arrays(self):
        K = 64 * 1024
        shapes = [(1,), (7,), (63,), (64,), (65,), (128,), (24727 // 4,), (K // 4 - 1,),
                  (K // 4,), (K // 4 + 1,), (3, 5), (300, 70), (2, 3, 4), (4, 64, 64),
                  (2, 2, 2, 2), (70000,), (1, 1, 300)]
        for shape in shapes:
            self.check_array(rand(shape, np.float32))

    def test_other_dtypes(self):
        for shape in [(5,), (255,), (256,), (65535,), (65536,), (65537,), (3, 300)]:
            self.check_array(rand(shape, np.int8))
            self.check_array(rand(shape, BF16))

    def test_payload_size_edges(self):
        # Payloads just below/above 256 bytes (SHORT_BINBYTES) and 64 KiB (out of frame).
        for n in (255, 256, 257, 65535, 65536, 65537):
            self.check_array(rand((n,), np.int8))
            self.check_quantized(rand((1, n), np.int8), rand((1, 3), BF16))
        for n in (127, 128, 32767, 32768, 32769):  # bf16 bytes = 2n
            self.check_quantized(rand((3, 5), np.int8), rand((1, n), BF16))

    def test_quantized_shapes(self):
        cases = [((16, 24), (1, 24)), ((16, 24), (8, 24)), ((2, 16, 24), (2, 1, 24)),
                 ((2, 24, 16), (2, 8, 16)), ((8, 128, 256), (8, 1, 256)),
                 ((8, 256, 128), (8, 8, 128)), ((128, 64), (8, 64)),
                 ((256, 255), (1, 255)), ((300, 200), (1, 200))]
        for ws, ss in cases:
            self.check_quantized(rand(ws, np.int8), rand(ss, BF16))

    def test_frame_cut_points(self):
        # Small payloads accumulate in one frame; the C pickler cuts it at the first
        # save() after 64 KiB. Sweep the weight size across that point.
        for n in range(65536 - 330, 65536, 7):
            self.check_quantized(rand((1, n), np.int8), rand((1, 4), BF16))
        for n in range(16300, 16384, 3):  # scales just below 64 KiB after a small weight
            self.check_quantized(rand((1, 40), np.int8), rand((2, n), BF16))
        self.check_quantized(rand((1, 60000), np.int8), rand((1, 4000), BF16))

    def test_lazy_array_equals_ndarray(self):
        a = rand((3, 70001), np.float32)
        lazy = mc.LazyArray(a.shape, a.dtype, lambda s, c: a.reshape(-1)[s:s + c])
        self.assertEqual(written(mc.write_array, lazy), pickle.dumps(a, protocol=4))

    def test_binbytes8_header(self):
        # >= 4 GiB payloads use BINBYTES8; check the header with a counting sink.
        class Rec(mc.CountingSink):
            def __init__(self):
                super().__init__()
                self.parts = []

            def write(self, b):
                super().write(b)
                self.parts.append(bytes(b))

        n = 2**32 + 8
        lazy = mc.LazyArray((n,), np.dtype(np.int8), None)
        sink = Rec()
        mc.write_array(sink, lazy)
        self.assertIn(b"\x8e" + struct.pack("<Q", n), sink.parts)
        small = pickle.dumps(np.zeros(70000, np.int8), protocol=4)
        # Same stream except: 4 more header bytes, the shape's LONG1 (7 bytes instead of
        # BININT's 5), and the data.
        self.assertEqual(sink.nbytes, len(small) + 4 + 2 + n - 70000)

    def test_int_encoding(self):
        for v in (0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 + 8, 2**40, -1, -2**31):
            buf = io.BytesIO()
            p = mc._Pickler(buf, 1)
            p.save(v)
            p.finish()  # also checks that frames under 4 bytes lose their FRAME header
            self.assertEqual(buf.getvalue(), pickle.dumps(v, protocol=4), v)


class SizesTest(unittest.TestCase):
    def test_real_grok1_sizes(self):
        cfg = mc.make_config(**mc.PRESETS["grok-1"])
        sizes = mc.checkpoint_sizes(cfg)
        self.assertEqual(len(sizes), 770)
        by_kind = {}
        for _, name, n in sizes:
            kind = "/".join(name.split("/")[-3:-1]) if name.startswith("transformer") else name
            if "rms_norm" in name:
                kind = "rms_norm"
            by_kind.setdefault(kind, set()).add(n)
        want = {  # the spec's table of measured release file sizes
            mc.EMBED: 3221225637, "moe/linear": 1611137347, "moe/linear_v": 1611137347,
            "moe/linear_1": 1611399491, "multi_head_attention/linear": 37847359,
            "multi_head_attention/query": 37761334, "multi_head_attention/key": 6293814,
            "multi_head_attention/value": 6293814, "decoder_layer_63/router": 196770,
            "rms_norm": 24727,
        }
        self.assertEqual(len(by_kind), len(want) + 63)  # router keys carry the layer
        for kind, n in want.items():
            self.assertEqual(by_kind[kind], {n}, kind)
        self.assertEqual({n for _, name, n in sizes if name.endswith("router/w")}, {196770})
        self.assertEqual(sum(n for _, _, n in sizes), 318239886140)

    def test_count_only_cli(self):
        out = io.StringIO()
        self.assertEqual(quiet_main(["--count-only", "--preset", "grok-1"], out), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 771)
        self.assertEqual(lines[-1], "total 318,239,886,140 bytes in 770 files")

    def test_embedding_data_offset(self):
        # The spec: the embedding's data starts at byte 151.
        a = mc.LazyArray((131072, 6144), np.dtype(np.float32), None)
        sink = mc.CountingSink()
        p = mc._Pickler(sink, 1 << 20)
        p.save(a)
        self.assertEqual(sink.nbytes - a.nbytes, 151)


class OrderAndConfigTest(unittest.TestCase):
    def test_release_order(self):
        names = mc.release_param_names(21)
        self.assertEqual(len(names), 2 + 12 * 21)
        self.assertEqual(names, sorted(names))
        self.assertEqual(names[:2], [mc.EMBED, mc.FINAL_NORM])
        layers = [n.split("/")[1] for n in names[2::12]]
        self.assertEqual(layers[:5], ["decoder_layer_0", "decoder_layer_1", "decoder_layer_10",
                                      "decoder_layer_11", "decoder_layer_12"])
        self.assertEqual(layers[11:14], ["decoder_layer_19", "decoder_layer_2",
                                         "decoder_layer_20"])
        inside = [n.split("/", 2)[2] for n in names[2:14]]
        self.assertEqual(inside, mc.LAYER_PARAMS)

    def test_config(self):
        g = mc.make_config(**mc.PRESETS["grok-1"])
        self.assertEqual(g["embedding_multiplier_scale"], 78.38367176906169)
        self.assertEqual(g["attn_output_multiplier"], 0.08838834764831845)
        self.assertEqual(mc.ffn_size(6144, 8), 32768)
        t = mc.make_config(**mc.PRESETS["tiny"])
        self.assertEqual(mc.ffn_size(t["emb_size"], t["widening_factor"]) % 128, 0)
        self.assertEqual(t["sequence_len"], 8192)
        with self.assertRaisesRegex(ValueError, "row-parallel"):
            mc.make_config(**dict(mc.PRESETS["tiny"], q_heads=3, kv_heads=1, key_size=6))
        self.assertEqual(quiet_main(["--count-only", "--q-heads", "3", "--kv-heads", "1",
                                  "--key-size", "6"]), 2)


class TinyCheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.cfg = mc.make_config(**mc.PRESETS["tiny"])
        cls.dirs = {}
        for key, seed in (("a", 1), ("b", 1), ("c", 2)):
            d = os.path.join(cls.tmp.name, key)
            mc.write_checkpoint(d, cls.cfg, seed=seed, log=None)
            cls.dirs[key] = d

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def files(self, key):
        ckpt = os.path.join(self.dirs[key], "ckpt-0")
        return [os.path.join(ckpt, f) for f in sorted(os.listdir(ckpt))]

    def test_layout_and_contents(self):
        L = self.cfg["num_layers"]
        files = self.files("a")
        self.assertEqual([os.path.basename(f) for f in files],
                         [f"tensor{i:05d}_000" for i in range(2 + 12 * L)])
        shapes = mc.param_shapes(self.cfg)
        self.assertEqual(list(shapes), sorted(shapes))
        saw_min = saw_max = False
        for path, (name, (kind, shp)) in zip(files, shapes.items()):
            obj = load(path)
            if kind == "q8":
                self.assertIsInstance(obj, QuantizedWeight8bit, name)
                self.assertEqual((obj.weight.dtype, obj.weight.shape), (np.dtype(np.int8), shp[0]))
                self.assertEqual((obj.scales.dtype, obj.scales.shape), (BF16, shp[1]))
                saw_min |= bool((obj.weight == -128).any())
                saw_max |= bool((obj.weight == 127).any())
                s = obj.scales.astype(np.float32)
                self.assertTrue((s > 0).all(), name)
                self.assertGreater(np.log(s).std(), 0.2, name)  # log-normal spread
                if s.shape[-2] == 8:  # row-parallel: blocks differ
                    self.assertFalse(np.array_equal(s[..., 0, :], s[..., 1, :]), name)
            else:
                self.assertIsInstance(obj, np.ndarray)
                self.assertEqual((obj.dtype, obj.shape), (np.dtype(np.float32), shp[0]), name)
                if name.endswith("/scale"):  # post-norms carry the branch gain
                    gain = mc.branch_gain(self.cfg) if name.endswith(("_1/scale", "_3/scale")) else 1.0
                    self.assertTrue((obj > 0).all() and abs(obj.mean() / gain - 1) < 0.1, name)
            with open(path, "rb") as f:  # the file is exactly what pickle would write
                self.assertEqual(f.read(), pickle.dumps(obj, protocol=4), name)
        self.assertTrue(saw_min and saw_max)
        with open(os.path.join(self.dirs["a"], "config.json")) as f:
            self.assertEqual(json.load(f), self.cfg)

    def test_seed_determinism(self):
        for fa, fb, fc in zip(self.files("a"), self.files("b"), self.files("c")):
            with open(fa, "rb") as a, open(fb, "rb") as b, open(fc, "rb") as c:
                da, db, dc = a.read(), b.read(), c.read()
            self.assertEqual(da, db, fa)
            self.assertNotEqual(da, dc, fa)

    def test_refuses_non_empty_dir(self):
        with self.assertRaises(FileExistsError):
            mc.write_checkpoint(self.dirs["a"], self.cfg, log=None)
        self.assertEqual(quiet_main([self.dirs["a"], "--layers", "1"]), 2)

    def test_force_removes_stale_files(self):
        d = os.path.join(self.tmp.name, "force")
        mc.write_checkpoint(d, self.cfg, log=None)
        self.assertEqual(quiet_main([d, "--layers", "1", "--force", "--vocab", "64"]), 0)
        self.assertEqual(len(os.listdir(os.path.join(d, "ckpt-0"))), 14)
        self.assertEqual(load(os.path.join(d, "ckpt-0", "tensor00000_000")).shape, (64, 128))


class ValuesTest(unittest.TestCase):
    def test_chunk_size_independence(self):
        cfg = mc.make_config(**dict(mc.PRESETS["tiny"], layers=1, vocab=300))
        shapes = mc.param_shapes(cfg)
        for idx, name in enumerate(shapes):
            kind, shp = shapes[name]
            v = mc.param_value(name, kind, shp, cfg, 7, idx)
            outs = {written(mc.write_param, v, chunk_bytes=c) for c in (1001, 4096, 1 << 22)}
            self.assertEqual(len(outs), 1, name)

    def test_fill_random_access(self):
        for lazy in (mc._codes_i8(3, 5, (1001,)), mc._normal_f32(3, 5, (1001,), 1.0)):
            whole = lazy.fill(0, 1001)
            for start, count in ((0, 1), (1, 7), (3, 500), (998, 3), (517, 484)):
                np.testing.assert_array_equal(lazy.fill(start, count), whole[start:start + count])

    def test_calibration(self):
        """Logits, attention logits and router logits have the intended magnitudes."""
        cfg = mc.make_config(**dict(mc.PRESETS["tiny"], layers=1))
        shapes = mc.param_shapes(cfg)
        rng = np.random.default_rng(0)

        def value(suffix, boost=0.0):
            idx, name = next((i, n) for i, n in enumerate(shapes) if n.endswith(suffix))
            v = mc.param_value(name, *shapes[name], cfg, 11, idx, boost)
            dense = lambda a: a.fill(0, a.size).reshape(a.shape).astype(np.float32)  # noqa
            return dense(v[0]) * dense(v[1]) if isinstance(v, tuple) else dense(v)

        D, H, dh = cfg["emb_size"], cfg["num_q_heads"], cfg["key_size"]
        a = rng.standard_normal((256, D)) * value("decoder_layer_0/rms_norm/scale")
        logits = a @ value("embeddings").T * cfg["output_multiplier_scale"]
        self.assertTrue(2.0 < logits.std(axis=1).mean() < 4.0, logits.std())
        router = a @ value("router/w")
        self.assertTrue(0.6 < router.std() < 1.5, router.std())
        gate = a @ value("moe/linear/w")[0]
        self.assertTrue(0.6 < gate.std() < 1.5, gate.std())
        for boost in (0.0, 4.0):
            q = (a @ value("query/w", boost)).reshape(-1, H, dh)
            k = (a @ value("key/w", boost)).reshape(-1, H, dh)  # tiny: H == KV
            s = np.einsum("thd,uhd->htu", q, k) * cfg["attn_output_multiplier"]
            plain = s[[h for h in range(H) if h % 4]]
            self.assertTrue(1.5 < plain.std() < 4.0, plain.std())
            frac = (np.abs(s[::4]) > 30).mean()
            if boost:
                self.assertGreater(frac, 0.25)
            else:
                self.assertLess(frac, 1e-3)
        codes = mc.CODE_TABLE
        self.assertEqual((codes.min(), codes.max()), (-128, 127))
        self.assertTrue(20 < math.sqrt(mc.CODE_VAR) < 30)


if __name__ == "__main__":
    unittest.main()
