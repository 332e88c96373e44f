"""The device engine on the host backend (device_cases.py), and its refusals."""
import os
import unittest

from device_cases import DeviceCases
from e2e_util import run


class HostDevice(DeviceCases, unittest.TestCase):
    DEVICE = "host"
    THRESHOLDS = ()  # validate logits' defaults: max KL 1e-3, top-1 100 % outside near-ties

    def test_refusals(self):
        m = self.model[2]
        cases = [
            (["--device", "host", "--gpus", "5"], "device 5 does not exist"),
            (["--device", "host", "--gpus", "x"], "'x' is not a device index"),
            (["--device", "host", "--comm", "nccl"], "--comm nccl needs one CUDA device per rank"),
            (["--device", "host", "--host-count", "2"], "--host-count 2 needs --hosts leader:port"),
            (["--device", "gpu"], "unknown device 'gpu'"),
            (["--hosts", "127.0.0.1:1", "--host-count", "2"], "several hosts need a device engine"),
            (["--device", "host", "--loader", "cufile"], "--loader cufile reads into CUDA device memory"),
            (["--device", "host", "--loader", "mmap"], "unknown loader 'mmap'"),
            (["--loader", "cufile"], "the CPU engine memory-maps its shards"),
        ]
        for flags, message in cases:
            with self.subTest(flags=flags):
                p = run("logits", m, "--tokens", self.tokens_path, "--out", self.path("never.npy"), "--force",
                        "--no-progress", *flags)
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn(message, p.stderr)

    def test_cuda_without_a_gpu_says_why(self):
        p = run("logits", self.model[1], "--tokens", self.tokens_path, "--out", self.path("never.npy"), "--force",
                "--no-progress", "--device", "cuda")
        if p.returncode == 0:
            self.skipTest("this machine has a usable CUDA device")
        self.assertEqual(p.returncode, 1)
        self.assertRegex(p.stderr, r"CUDA backend is not installed|CUDA is not usable|cannot load the CUDA backend|"
                         r"not a compatible grokit CUDA backend")

    def test_bench_device_runs_on_the_host_backend(self):
        # The GPU benchmark's code path end to end on a small layer (the numbers mean
        # nothing here): every row printed, every ratio a positive number.
        p = run("bench-device", "--device", "host", "--small", "--context", 64, "--prefill-tokens", 80,
                "--load-mb", 16, "--reps", 1, "--work", self.tmp)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.strip().splitlines()
        self.assertTrue(lines[0].startswith("benchmark"), p.stdout)
        rows = {line[:30].strip(): line for line in lines[1:]}
        for what in ("device read bandwidth", "host-to-device (pinned)", "decode step, int8, batch 1",
                     "decode step, int4, batch 1", "bf16 matrix product (peak)", "prefill 80 tokens, int8",
                     "file read (page cache)", "shard load (page cache)", "the same load"):
            self.assertIn(what, rows, p.stdout)
        for what in ("decode step, int8, batch 1", "decode step, int4, batch 1", "prefill 80 tokens, int8",
                     "shard load (page cache)"):
            ratio = float(rows[what].split()[-3])  # ... ratio ">=" target
            self.assertGreater(ratio, 0, rows[what])
        self.assertGreater(float(rows["the same load"].split()[-1]), 0, rows["the same load"])  # vs the file read
        self.assertEqual([f for f in os.listdir(self.tmp) if f.startswith("grokit-bench-load")], [])


if __name__ == "__main__":
    unittest.main()
