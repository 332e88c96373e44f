"""The device engine on CUDA (device_cases.py): every TP degree on one GPU, ranks sharing
it through the in-process device communicator; graphs against op-by-op decoding;
overlapped launches against serialized ones.
Exits 77 (CTest: skipped) with the reason when no CUDA device is usable."""
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from device_cases import DeviceCases  # noqa: E402
from e2e_util import run  # noqa: E402


class CudaDevice(DeviceCases, unittest.TestCase):
    DEVICE = "cuda"
    BATCH_INVARIANT = False
    ROUTING_EXACT = False  # tensor-core products: see device_cases.py on routing near-ties
    # The budget for CUDA against the reference: mean KL <= 1e-3, p99 <= 1e-2.
    THRESHOLDS = ("--max-kl", "1", "--max-mean-kl", "1e-3", "--max-p99-kl", "1e-2", "--min-top1", "0.97")

    def test_cufile_loader_gives_the_same_logits(self):
        staged = np.load(self.logits(2, "staged.npy"))
        out = self.path("cufile.npy")
        p = run("logits", self.model[2], "--tokens", self.tokens_path, "--out", out, "--force", "--no-progress",
                "--device", "cuda", "--loader", "cufile")
        if p.returncode != 0 and "--loader cufile: " in p.stderr:
            self.skipTest("GPUDirect Storage is not usable here: " + p.stderr.strip().splitlines()[-1])
        self.assertEqual(p.returncode, 0, p.stderr)
        np.testing.assert_array_equal(np.load(out), staged)

    def test_overlapped_launches_change_no_bit(self):
        # Programmatic dependent launch (sm_90+): each kernel of a step may start before the
        # one ahead of it ends, and waits for it before touching its data. The same tokens
        # and logits with it turned off say that no kernel reads ahead of its wait (TP 2:
        # two ranks' streams and the in-process communicator between them).
        serial = dict(os.environ, GROKIT_CUDA_PDL="0")
        for what, args in (("tokens", ["run", self.model[2], "--tokens-in", self.tokens_path, "--max-tokens", 12,
                                       "--temperature", 0, "--ignore-eos", "--tokens-out"]),
                           ("logits", ["logits", self.model[2], "--tokens", self.tokens_path, "--out"])):
            outs = []
            for i, env in enumerate((None, serial)):
                out = self.path(f"pdl_{what}{i}.npy")
                p = run(*args, out, "--force", "--no-progress", "--device", "cuda", env=env)
                self.assertEqual(p.returncode, 0, p.stderr)
                outs.append(np.load(out))
            np.testing.assert_array_equal(outs[0], outs[1], what)


if __name__ == "__main__":
    p = run("devices")
    if p.returncode != 0:
        # GROKIT_REQUIRE_CUDA=1 (scripts/gpu-check.sh): the GPU machine must run these.
        required = os.environ.get("GROKIT_REQUIRE_CUDA") == "1"
        print(f"{'FAILED' if required else 'skipped'}: no usable CUDA device: {p.stderr.strip()}")
        sys.exit(1 if required else 77)
    unittest.main()
