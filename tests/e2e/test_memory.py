"""The runner memory-maps the weights: its anonymous memory (RssAnon) stays far below the
size of the model it runs, whatever that size; the quantizer's too."""
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
        """Two models, one about 10x larger: the runner's anonymous memory grows by far less
        than the weights do (the baseline itself, sanitizer runtimes included, cancels)."""
        tmp = tempfile.mkdtemp(prefix="grokit-mem-")
        try:
            peaks, sizes, quant_peaks = [], [], {}
            for name, emb in (("small", 128), ("large", 512)):
                ckpt = write_checkpoint(os.path.join(tmp, name), tiny_config(emb=emb, layers=4, key_size=emb // 8))
                model = os.path.join(tmp, name + "-m")
                run("convert", ckpt, model, "--tp", 1, "--no-progress", check=0)
                sizes.append(sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)) // 1024)
                tokens = os.path.join(tmp, "t.npy")
                np.save(tokens, np.full((1, 8), 5, np.int32))
                rc, peak, err = peak_rss_anon_kib(["run", model, "--tokens-in", tokens, "--max-tokens", 16,
                                                   "--temperature", 0, "--threads", 2, "--no-progress"])
                self.assertEqual(rc, 0, err)
                self.assertGreater(peak, 0)
                peaks.append(peak)
                # The quantizer streams too: its buffers are a few items per thread.
                for scheme in ("fp8", "int4"):
                    rc, peak, err = peak_rss_anon_kib(["quantize", model, f"{model}-{scheme}", "--scheme", scheme,
                                                       "--group-size", 32, "--threads", 2, "--no-progress"])
                    self.assertEqual(rc, 0, err)
                    quant_peaks.setdefault(scheme, []).append(peak)
            grown, weights = peaks[1] - peaks[0], sizes[1] - sizes[0]
            self.assertGreater(weights, 30 * 1024)
            self.assertLess(grown, weights // 4,
                            f"RssAnon {peaks} KiB for weights {sizes} KiB: grew {grown} KiB for {weights} KiB")
            for scheme, qp in quant_peaks.items():
                self.assertLess(qp[1] - qp[0], weights // 4,
                                f"quantize {scheme}: RssAnon {qp} KiB for weights {sizes} KiB")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
