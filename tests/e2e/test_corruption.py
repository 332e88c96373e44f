"""Corrupted models: random bit flips in shard data, index, header and padding, and
truncated or missing files. verify and the loaders name what is bad; nothing crashes."""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

from e2e_util import GROKIT, SOURCE_DIR, run, tiny_config, write_checkpoint

sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "python"))
import grokit_format  # noqa: E402  (the independent reader: where things are in a shard)

TRIALS = 12  # per region kind


class Corruption(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-corrupt-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(layers=2))
        cls.model = os.path.join(cls.tmp, "model")
        run("convert", cls.ckpt, cls.model, "--tp", 2, "--no-progress", check=0)
        cls.rng = random.Random(1234)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def fresh_copy(self):
        d = os.path.join(self.tmp, "case")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.model, d)
        return d

    def flip(self, path, offset):
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([b ^ (1 << self.rng.randrange(8))]))

    def run_all(self, model):
        """verify, inspect and validate tensors on a model; none may crash."""
        out = {}
        for name, args in (("verify", ["verify", model, "--no-progress"]), ("inspect", ["inspect", model]),
                           ("validate", ["validate", "tensors", self.ckpt, model, "--no-progress"])):
            p = run(*args)
            self.assertIn(p.returncode, (0, 1), f"{name} crashed: rc {p.returncode}\n{p.stderr}")
            out[name] = p
        return out

    def pick_shard(self, model):
        rank = self.rng.randrange(2)
        path = os.path.join(model, grokit_format.shard_file_name(rank, 2))
        return rank, path, grokit_format.read_shard(path, verify=False)

    def test_flips_in_tensor_data_name_the_tensor(self):
        for _ in range(TRIALS):
            model = self.fresh_copy()
            rank, path, shard = self.pick_shard(model)
            e = self.rng.choice(shard.entries)
            self.flip(path, shard.header["data_offset"] + e["offset"] + self.rng.randrange(e["stored_size"]))
            r = self.run_all(model)
            self.assertEqual(r["verify"].returncode, 1)
            self.assertIn(f"rank {rank}  {e['name']}: ", r["verify"].stdout)
            self.assertIn("checksum mismatch", r["verify"].stdout)
            self.assertEqual(r["validate"].returncode, 1)
            self.assertIn(f"rank {rank}  {e['name']}: ", r["validate"].stdout)

    def test_the_device_loader_names_a_flipped_tensor(self):
        # The device engine hashes the bytes on their way to the device (here the host
        # backend), staged or mapped: a flip fails the load with the tensor's name, before
        # any output.
        tokens = os.path.join(self.tmp, "tokens.npy")
        np.save(tokens, np.array([[5, 6, 7, 8]], dtype=np.int32))
        for _ in range(3):
            model = self.fresh_copy()
            rank, path, shard = self.pick_shard(model)
            e = self.rng.choice(shard.entries)
            self.flip(path, shard.header["data_offset"] + e["offset"] + self.rng.randrange(e["stored_size"]))
            out = os.path.join(self.tmp, "never.npy")
            if os.path.exists(out):
                os.remove(out)
            for loader in ("staged", "mapped"):
                p = run("logits", model, "--tokens", tokens, "--out", out, "--force", "--no-progress", "--device",
                        "host", "--loader", loader)
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn(e["name"], p.stderr)
                self.assertIn("checksum", p.stderr)
                self.assertFalse(os.path.exists(out), "a failed run left an output file")
            p = run("logits", model, "--tokens", tokens, "--out", out, "--force", "--no-progress", "--device", "host",
                    "--no-verify")
            self.assertEqual(p.returncode, 0, p.stderr)  # unchecked: the flip goes through

    def test_flips_in_the_index_are_caught(self):
        for _ in range(TRIALS):
            model = self.fresh_copy()
            _, path, shard = self.pick_shard(model)
            h = shard.header
            self.flip(path, h["index_offset"] + self.rng.randrange(h["index_size"]))
            for name, p in self.run_all(model).items():
                self.assertEqual(p.returncode, 1, name)
                self.assertIn("index checksum", p.stderr, name)

    def test_flips_in_the_header_are_caught(self):
        for _ in range(TRIALS):
            model = self.fresh_copy()
            _, path, _ = self.pick_shard(model)
            self.flip(path, self.rng.randrange(128))
            for name, p in self.run_all(model).items():
                self.assertEqual(p.returncode, 1, name)
                self.assertRegex(p.stderr, r"header checksum mismatch|bad magic", name)

    def test_flips_in_padding_are_caught_by_verify(self):
        model = self.fresh_copy()
        _, path, shard = self.pick_shard(model)
        e = next(e for e in shard.entries if e["stored_size"] % shard.header["alignment"])
        gap = shard.header["data_offset"] + e["offset"] + e["stored_size"]  # padding follows
        self.flip(path, gap)
        r = self.run_all(model)
        self.assertEqual(r["verify"].returncode, 1)
        self.assertIn(f"padding after tensor '{e['name']}' is not zero", r["verify"].stdout)

    def test_truncated_or_missing_shards_are_named(self):
        model = self.fresh_copy()
        path = os.path.join(model, grokit_format.shard_file_name(1, 2))
        os.truncate(path, os.path.getsize(path) - 4096)
        for name, p in self.run_all(model).items():
            self.assertEqual(p.returncode, 1, name)
            self.assertIn("(truncated)", p.stderr, name)
        os.remove(path)
        for name, p in self.run_all(model).items():
            self.assertEqual(p.returncode, 1, name)
            self.assertIn("shard 1 (shard-00001-of-00002.gkt) is missing", p.stderr, name)

    def test_random_manifest_flips_never_crash(self):
        for _ in range(TRIALS):
            model = self.fresh_copy()
            path = os.path.join(model, "manifest.json")
            self.flip(path, self.rng.randrange(os.path.getsize(path)))
            self.run_all(model)  # a flip in free text may go unnoticed; none may crash


if __name__ == "__main__":
    unittest.main()
