"""End to end: `grokit convert` output read back by the independent Python reader
(tests/python/grokit_format.py) and compared, tensor by tensor and rank by rank, with an
independent reading of the source pickles sliced per format/SPEC.md §6.

Env: GROKIT_BIN (the grokit binary; default <repo>/build/bin/grokit) and
GROKIT_SOURCE_DIR (the repository; default two levels up from here)."""
from __future__ import annotations

import filecmp
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.abspath(os.environ.get("GROKIT_SOURCE_DIR") or os.path.join(HERE, "..", ".."))
GROKIT_BIN = os.path.abspath(os.environ.get("GROKIT_BIN") or os.path.join(SOURCE_DIR, "build", "bin", "grokit"))
sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "python"))
sys.path.insert(0, os.path.join(SOURCE_DIR, "scripts"))

import grokit_format as gf  # noqa: E402
import make_checkpoint  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)

# Small checkpoints (tiny preset with overrides). F = int(3 * 128) * 2 // 3 = 256.
BASE = dict(vocab=256, emb=128, layers=11, q_heads=8, kv_heads=8, key_size=16, experts=4,
            selected=2, widening_factor=3.0, seq_len=64)
CASES = {
    # name: (size overrides, TP degrees)
    "base": ({}, (1, 2, 4, 8)),
    "kv2": (dict(kv_heads=2, layers=2), (4, 8)),         # fewer kv heads than TP
    "tp16": (dict(q_heads=16, kv_heads=4, layers=2), (16,)),  # TP > 8 scale blocks, kv < TP
}


# ---- An independent reading of the release pickles. -----------------------------------
class QuantizedWeight8bit:
    """Stand-in for the reference's __main__.QuantizedWeight8bit (fields weight, scales)."""


class SafeUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("ml_dtypes", "bfloat16"),
        ("__main__", "QuantizedWeight8bit"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if (module, name) == ("__main__", "QuantizedWeight8bit"):
            return QuantizedWeight8bit
        if (module, name) == ("ml_dtypes", "bfloat16"):
            return ml_dtypes.bfloat16
        return super().find_class(module, name)


def load_source(path):
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


LAYER_KINDS = ["moe.gate", "moe.down", "moe.up", "attn.key", "attn.output", "attn.query",
               "attn.value", "attn.norm_in", "attn.norm_out", "moe.norm_in", "moe.norm_out",
               "moe.router"]  # SPEC §5 table order = release order inside a layer


def release_names(num_layers):
    """Tensor names in release file order (SPEC §8)."""
    out = ["embedding", "final_norm"]
    for i in sorted(range(num_layers), key=str):
        out += [f"layer.{i}.{k}" for k in LAYER_KINDS]
    return out


# ---- SPEC §6, written out again. -------------------------------------------------------
def expected_slice(kind, cfg, tp, r):
    """(split_axis, start, length) along that axis, or (-1, 0, 0) for a replicated tensor."""
    V, H, KV, dh, F = (cfg["vocab_size"], cfg["num_q_heads"], cfg["num_kv_heads"],
                       cfg["key_size"], cfg["ffn_size"])
    if kind == "embedding":
        return 0, r * V // tp, V // tp
    if kind == "attn.query":
        return 1, r * H * dh // tp, H * dh // tp
    if kind in ("attn.key", "attn.value"):
        if KV >= tp:
            return 1, r * KV * dh // tp, KV * dh // tp
        k = (r * (H // tp)) // (H // KV)
        return 1, k * dh, dh
    if kind == "attn.output":
        return 0, r * H * dh // tp, H * dh // tp
    if kind in ("moe.gate", "moe.up"):
        return 2, r * F // tp, F // tp
    if kind == "moe.down":
        return 1, r * F // tp, F // tp
    return -1, 0, 0


def take(a, axis, start, length):
    if axis < 0:
        return a
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, start + length)
    return a[tuple(idx)]


def expected_tensor(kind, src, cfg, tp, r):
    """(dtype, param, split_axis, split_start, local payload as arrays) for rank r."""
    axis, start, length = expected_slice(kind, cfg, tp, r)
    if isinstance(src, QuantizedWeight8bit):
        w, s = src.weight, src.scales
        if axis == w.ndim - 2:  # row split: the scale blocks the rows fall in
            per_block = w.shape[-2] // s.shape[-2]
            first, last = start // per_block, -(-(start + length) // per_block)
            scales = take(s, axis, first, last - first)
        else:
            scales = take(s, axis, start, length)
        return (gf.Q8RB, scales.shape[-2], axis, start,
                (take(w, axis, start, length), scales.view(np.uint16)))
    if kind == "embedding":
        return gf.BF16, 0, axis, start, take(src, axis, start, length).astype(BF16).view(np.uint16)
    return gf.F32, 0, axis, start, take(src, axis, start, length)


# ---- The test. -------------------------------------------------------------------------
def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class FormatPythonTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.access(GROKIT_BIN, os.X_OK):
            raise unittest.SkipTest(f"grokit binary not found at {GROKIT_BIN} (set GROKIT_BIN)")
        cls.tmp = tempfile.mkdtemp(prefix="grokit-format-py-")
        cls.ckpt, cls.models = {}, {}
        for name, (over, tps) in CASES.items():
            sizes = dict(BASE, **over)
            root = os.path.join(cls.tmp, "src-" + name)
            make_checkpoint.write_checkpoint(root, make_checkpoint.make_config(**sizes), seed=7)
            cls.ckpt[name] = os.path.join(root, "ckpt-0")
            for tp in tps:
                out = os.path.join(cls.tmp, f"{name}-tp{tp}")
                run([GROKIT_BIN, "convert", cls.ckpt[name], out, "--tp", str(tp), "--no-progress"])
                cls.models[(name, tp)] = out

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def source(self, name):
        with open(os.path.join(os.path.dirname(self.ckpt[name]), "config.json")) as f:
            num_layers = json.load(f)["num_layers"]
        names = release_names(num_layers)
        return {n: load_source(os.path.join(self.ckpt[name], f"tensor{i:05d}_000"))
                for i, n in enumerate(names)}

    def test_every_tensor_matches_the_source(self):
        for name, (over, tps) in CASES.items():
            src = self.source(name)
            with open(os.path.join(os.path.dirname(self.ckpt[name]), "config.json")) as f:
                official = json.load(f)
            for tp in tps:
                with self.subTest(case=name, tp=tp):
                    self.check_model(self.models[(name, tp)], src, official, tp)

    def check_model(self, model_dir, src, official, tp):
        m, shards = gf.read_model(model_dir)
        cfg = m["config"]
        self.assertEqual(m["format"], "grokit-model")
        self.assertEqual(m["format_version"], 1)
        self.assertEqual(m["tensor_parallel"], tp)
        self.assertEqual(m["scheme"], "int8")
        self.assertEqual(m["tensor_count"], 2 + 12 * official["num_layers"])
        self.assertEqual(m["tensor_count"], len(src))
        for k, v in official.items():  # the official fields pass through unchanged
            self.assertEqual(cfg[k], v, k)
        self.assertEqual(cfg["ffn_size"], make_checkpoint.ffn_size(official["emb_size"], official["widening_factor"]))
        self.assertEqual(cfg["attn_output_scale_blocks"], make_checkpoint.ROW_BLOCKS)
        self.assertEqual(cfg["moe_down_scale_blocks"], make_checkpoint.ROW_BLOCKS)
        self.assertEqual(m["derived"]["output_multiplier_bf16"], 0.578125)
        self.assertEqual([f["tensor"] for f in m["provenance"]["files"]], list(src))
        # The manifest prints its config as SPEC §7's canonical text (json.dumps, indent 2).
        with open(os.path.join(model_dir, gf.MANIFEST)) as f:
            text = f.read()
        canon = json.dumps({k: cfg[k] for k in gf.CONFIG_KEYS}, indent=2)
        self.assertIn(canon.replace("\n", "\n  "), text)
        self.assertEqual(len(shards), tp)
        for r, sh in enumerate(shards):
            h = sh.header
            self.assertEqual(h["checksums_verified"], gf.HAVE_XXHASH)
            self.assertEqual((h["rank"], h["rank_count"], h["alignment"]), (r, tp, 4096))
            self.assertEqual([e["name"] for e in sh.entries], list(src))  # release order (§8)
            gf.check_padding(sh)
            offsets = [e["offset"] for e in sh.entries]
            self.assertEqual(offsets, sorted(offsets))
            for e in sh.entries:
                kind = e["name"] if e["name"] in ("embedding", "final_norm") else e["name"].split(".", 2)[2]
                dtype, param, axis, start, want = expected_tensor(kind, src[e["name"]], cfg, tp, r)
                where = f"{os.path.basename(sh.path)} {e['name']}"
                got = gf.tensor_array(sh, e, bf16_bits=True)
                self.assertEqual((e["dtype"], e["param"], e["split_axis"], e["split_start"], e["compression"]),
                                 (dtype, param, axis, start, 0), where)
                if dtype == gf.Q8RB:
                    self.assertEqual(e["global_shape"], list(src[e["name"]].weight.shape), where)
                    for g, w, what in zip(got, want, ("codes", "scales")):
                        self.assertEqual(g.shape, w.shape, f"{where} {what}")
                        self.assertTrue(np.array_equal(g, w), f"{where} {what}")
                    # The dequantized weight is bf16(bf16(code) * scale), block by block.
                    deq = gf.dequantize_q8rb(*got)
                    ref = (want[0].astype(np.float32)
                           * np.repeat(want[1].view(BF16).astype(np.float32),
                                       want[0].shape[-2] // want[1].shape[-2], axis=-2)).astype(BF16)
                    self.assertTrue(np.array_equal(deq.view(np.uint16), ref.view(np.uint16)), where)
                else:
                    self.assertEqual(e["global_shape"], list(src[e["name"]].shape), where)
                    self.assertEqual(got.shape, want.shape, where)
                    self.assertEqual(got.tobytes(), np.ascontiguousarray(want).tobytes(), where)  # bitwise

    def test_kv_heads_are_replicated(self):
        cfg = gf.read_manifest(self.models[("kv2", 8)])["config"]
        H, KV, dh = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["key_size"]
        _, shards = gf.read_model(self.models[("kv2", 8)])
        starts = [sh.by_name["layer.1.attn.key"]["split_start"] for sh in shards]
        self.assertEqual(starts, [(r * KV // 8) * dh for r in range(8)])
        self.assertEqual(H // KV, 4)
        self.assertEqual(starts, [0, 0, 0, 0, dh, dh, dh, dh])

    def test_scale_blocks_shared_when_tp_exceeds_blocks(self):
        _, shards = gf.read_model(self.models[("tp16", 16)])
        for name in ("layer.0.attn.output", "layer.1.moe.down"):
            params = [sh.by_name[name]["param"] for sh in shards]
            self.assertEqual(params, [1] * 16, name)
            scales = [gf.tensor_array(sh, name, bf16_bits=True)[1] for sh in shards]
            for r in range(0, 16, 2):  # ranks 2b and 2b+1 hold scale block b
                self.assertTrue(np.array_equal(scales[r], scales[r + 1]), f"{name} ranks {r}, {r + 1}")
        _, shards = gf.read_model(self.models[("base", 2)])
        self.assertEqual([sh.by_name["layer.0.moe.down"]["param"] for sh in shards], [4, 4])

    def test_conversion_is_deterministic(self):
        first = self.models[("base", 2)]
        again = os.path.join(self.tmp, "base-tp2-again")
        run([GROKIT_BIN, "convert", self.ckpt["base"], again, "--tp", "2", "--no-progress", "--threads", "1"])
        names = sorted(os.listdir(first))
        self.assertEqual(names, sorted(os.listdir(again)))
        self.assertNotIn(gf.STATE_DIR, names)
        match, mismatch, errors = filecmp.cmpfiles(first, again, names, shallow=False)
        self.assertEqual((mismatch, errors), ([], []))
        self.assertEqual(sorted(match), names)

    def test_reader_refuses_damaged_input(self):
        model = self.models[("base", 1)]
        work = os.path.join(self.tmp, "damaged")
        shutil.copytree(model, work)
        shard = os.path.join(work, gf.shard_file_name(0, 1))
        with open(shard, "rb") as f:
            original = f.read()

        def write(b):
            with open(shard, "wb") as f:
                f.write(b)

        cases = {
            "bad magic": b"X" + original[1:],
            "not supported": original[:8] + struct.pack("<I", 2) + original[12:],
            "shorter than": original[:100],
            "the file has": original[:-1],
        }
        for what, data in cases.items():
            with self.subTest(what):
                write(data)
                with self.assertRaisesRegex(gf.FormatError, what):
                    gf.read_shard(shard, verify=False)
        write(original)
        gf.read_shard(shard)
        with open(os.path.join(work, gf.MANIFEST)) as f:
            m = json.load(f)
        m["format_version"] = 2
        with open(os.path.join(work, gf.MANIFEST), "w") as f:
            json.dump(m, f)
        with self.assertRaisesRegex(gf.FormatError, "version 2 is not supported"):
            gf.read_manifest(work)
        os.remove(os.path.join(work, gf.MANIFEST))
        with self.assertRaisesRegex(gf.FormatError, "incomplete conversion"):
            gf.read_manifest(work)
        self.assertRaisesRegex(gf.FormatError, "multiple of 32", gf.payload_size, gf.Q4G, [4, 4], 32)
        self.assertRaisesRegex(gf.FormatError, "group 48", gf.payload_size, gf.Q4G, [96, 4], 48)
        # SPEC §4.1: per group, G/2 code bytes per column, then bf16 scales padded to 16 bytes
        self.assertEqual(gf.payload_size(gf.Q4G, [2, 64, 10], 32), 2 * 2 * (16 * 10 + 32))
        self.assertEqual(gf.payload_size(gf.F8COL, [64, 10], 0), 64 * 10 + 32)
        self.assertRaisesRegex(gf.FormatError, "unknown dtype", gf.payload_size, 99, [4], 0)

    def test_checksums_flag(self):
        sh = gf.read_shard(os.path.join(self.models[("base", 1)], gf.shard_file_name(0, 1)))
        self.assertEqual(sh.header["checksums_verified"], gf.HAVE_XXHASH)
        if gf.HAVE_XXHASH:
            for e in sh.entries:
                gf.verify_tensor(sh, e)
        else:
            with self.assertRaisesRegex(gf.FormatError, "xxhash"):
                gf.read_shard(sh.path, verify=True)
            print("note: xxhash is not installed; checksums were not verified", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
