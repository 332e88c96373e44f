"""Hostile checkpoints: every hand-made attack in attacks.py, placed in an otherwise valid
checkpoint, is refused with a clear error naming the file, in bounded time and memory,
and nothing it asks for is executed."""
import os
import resource
import shutil
import subprocess
import tempfile
import time
import unittest

import attacks
from e2e_util import GROKIT, tiny_config, write_checkpoint

MEMORY_LIMIT = 1 << 30  # address space for one grokit run on a tiny checkpoint


def limit_memory():
    if not os.environ.get("GROKIT_SANITIZED"):  # ASan reserves terabytes of address space
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


class HostilePickles(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-hostile-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(layers=1))
        cls.marker = os.path.join(cls.tmp, "ATTACK-RAN")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def convert_with(self, victim_index, data):
        ck = os.path.join(self.tmp, "case", "ckpt-0")
        shutil.rmtree(os.path.dirname(ck), ignore_errors=True)
        shutil.copytree(os.path.dirname(self.ckpt), os.path.dirname(ck))
        victim = os.path.join(ck, f"tensor{victim_index:05d}_000")
        with open(victim, "wb") as f:
            f.write(data)
        out = os.path.join(self.tmp, "out")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.monotonic()
        p = subprocess.run([GROKIT, "convert", ck, out, "--tp", "2", "--no-progress"], capture_output=True,
                           text=True, timeout=60, preexec_fn=limit_memory)
        return p, time.monotonic() - t0, victim, out

    def test_every_attack_is_refused_and_nothing_runs(self):
        cases = attacks.attacks(self.marker)
        self.assertGreaterEqual(len(cases), 20)
        for name, (data, expect) in cases.items():
            for victim_index in (1, 7):  # the final norm, and a quantized layer weight
                with self.subTest(attack=name, file=victim_index):
                    p, seconds, victim, out = self.convert_with(victim_index, data)
                    self.assertEqual(p.returncode, 1, p.stderr)
                    self.assertIn(victim, p.stderr)
                    self.assertIn(expect, p.stderr)
                    self.assertLess(seconds, 10)
                    self.assertFalse(os.path.exists(self.marker), f"{name} executed something")
                    self.assertFalse(os.path.exists(os.path.join(out, "manifest.json")))

    def test_the_attacks_do_run_under_pythons_pickle(self):
        """The corpus is real: Python's own unpickler executes the command attack."""
        import pickle
        data, _ = attacks.attacks(self.marker)["os_system"]
        pickle.loads(data)
        self.assertTrue(os.path.exists(self.marker))
        os.remove(self.marker)

    def test_a_valid_checkpoint_still_converts(self):
        with open(os.path.join(self.ckpt, "tensor00001_000"), "rb") as f:
            p, _, _, _ = self.convert_with(1, f.read())
        self.assertEqual(p.returncode, 0, p.stderr)


if __name__ == "__main__":
    unittest.main()
