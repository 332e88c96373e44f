"""The runner memory-maps the weights: its anonymous memory (RssAnon) stays far below the
size of the model it runs, whatever that size."""
import os
import shutil
import subprocess
import tempfile
import time
import unittest

import numpy as np

from e2e_util import GROKIT, run, tiny_config, write_checkpoint


def peak_rss_anon_kib(args):
    p = subprocess.Popen([GROKIT, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.002)
    _, err = p.communicate()
    return p.returncode, peak, err


class Memory(unittest.TestCase):
    def test_weights_are_mapped_not_copied(self):
        tmp = tempfile.mkdtemp(prefix="grokit-mem-")
        try:
            ckpt = write_checkpoint(os.path.join(tmp, "ck"), tiny_config(emb=512, layers=4, q_heads=8, kv_heads=8,
                                                                         key_size=64))
            model = os.path.join(tmp, "m")
            run("convert", ckpt, model, "--tp", 1, "--no-progress", check=0)
            weights_kib = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)) // 1024
            self.assertGreater(weights_kib, 40 * 1024)
            tokens = os.path.join(tmp, "t.npy")
            np.save(tokens, np.full((1, 8), 5, np.int32))
            rc, peak, err = peak_rss_anon_kib(["run", model, "--tokens-in", tokens, "--max-tokens", 16,
                                               "--temperature", 0, "--threads", 2, "--no-progress"])
            self.assertEqual(rc, 0, err)
            self.assertGreater(peak, 0)
            self.assertLess(peak, weights_kib // 4, f"peak RssAnon {peak} KiB for {weights_kib} KiB of weights")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
