"""The device engine on the host backend (device_cases.py), and its refusals."""
import os
import socket
import subprocess
import time
import unittest

import numpy as np

from device_cases import DeviceCases
from e2e_util import GROKIT, run


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
        p = run("logits", m, "--tokens", self.tokens_path, "--out", self.path("never.npy"), "--device", "host",
                "--hosts", "127.0.0.1:1", "--host-count", "2", "--host-rank", "1")
        self.assertEqual(p.returncode, 2, p.stderr)  # a usage error
        self.assertIn("a follower host (--host-rank > 0) takes no --tokens, --out or --dump-layers", p.stderr)

    def test_two_hosts_give_the_bits_of_one(self):
        # The multi-host paths end to end on one machine: the leader and a follower process,
        # each driving 2 of the 4 ranks, over the host backend's TCP collectives (in NCCL's
        # place); the cluster's commands, the id hand-out and the load barrier are the ones
        # the CUDA engine uses.
        for tp, hosts in ((4, 2), (8, 4)):
            with self.subTest(tp=tp, hosts=hosts):
                one = np.load(self.logits(tp, f"one_host_tp{tp}.npy"))
                with socket.socket() as s:  # a free port for the leader
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                common = ["--device", "host", "--hosts", f"127.0.0.1:{port}", "--host-count", str(hosts), "--no-progress"]
                # A follower runs the leader's steps whichever command it was given.
                followers = [subprocess.Popen([GROKIT, ("run", "logits")[k % 2 == 0], self.model[tp], *common,
                                               "--host-rank", str(k)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                             for k in range(1, hosts)]
                out = self.path(f"hosts{hosts}.npy")
                try:
                    p = run("logits", self.model[tp], "--tokens", self.tokens_path, "--out", out, "--force",
                            *common, "--host-rank", "0", timeout=120)
                    logs = [f.communicate(timeout=60) for f in followers]
                finally:
                    for f in followers:
                        f.kill()
                self.assertEqual(p.returncode, 0, p.stderr)
                for f, (_, err) in zip(followers, logs):
                    self.assertEqual(f.returncode, 0, err)
                    self.assertIn("collectives: TCP (socket collectives)", err)
                    self.assertIn("the leader finished", err)
                np.testing.assert_array_equal(np.load(out), one)

    def test_hosts_say_they_wait_and_give_up_after_the_join_timeout(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        common = ["--device", "host", "--hosts", f"127.0.0.1:{port}", "--host-count", "2", "--host-join-timeout", "2",
                  "--no-progress"]
        prompt = self.path("join_prompt.npy")
        np.save(prompt, np.array([[5, 6, 7]], np.int32))
        t0 = time.monotonic()
        p = run("run", self.model[4], "--tokens-in", prompt, *common, timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(f"cluster: leader at 127.0.0.1:{port}: waiting up to 2 s for 1 other host to join", p.stderr)
        self.assertIn("host 1 did not join within 2 s (joined: none)", p.stderr)
        p = run("run", self.model[4], *common, "--host-rank", "1", timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(f"cluster: host 1 of 2: joining the leader at 127.0.0.1:{port} (waiting up to 2 s)", p.stderr)
        self.assertIn("no welcome from the leader", p.stderr)
        self.assertLess(time.monotonic() - t0, 30)
        p = run("run", self.model[4], "--tokens-in", prompt, *common[:-3], "--host-join-timeout", "0")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("--host-join-timeout must be at least 1 second (got 0)", p.stderr)

    def test_a_host_that_dies_ends_the_leaders_run_with_an_error(self):
        # A follower killed mid-generation: the leader stops with an error naming the lost
        # host, instead of waiting in a collective for ever.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        common = ["--device", "host", "--hosts", f"127.0.0.1:{port}", "--host-count", "2", "--no-progress"]
        prompt = self.path("dies_prompt.npy")
        np.save(prompt, np.array([[5, 6, 7, 8]], np.int32))
        follower = subprocess.Popen([GROKIT, "run", self.model[4], *common, "--host-rank", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        leader = subprocess.Popen([GROKIT, "run", self.model[4], *common, "--host-rank", "0", "--tokens-in", prompt,
                                   "--tokens-out", self.path("dies_out.npy"), "--force", "--max-tokens", "8000",
                                   "--ignore-eos", "--temperature", "0"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in follower.stderr:  # generation starts once every host has loaded
                if "loaded" in line:
                    break
            time.sleep(0.3)
            follower.kill()
            _, err = leader.communicate(timeout=60)
        finally:
            follower.kill()
            leader.kill()
        self.assertEqual(leader.returncode, 1, err)
        self.assertRegex(err, r"host 1 lost its connection|closed its connection", err)

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
        # The file read again by as many threads as the loader's readers.
        self.assertTrue(any(k.startswith("file read, ") and k.endswith(" threads") for k in rows), p.stdout)
        # The load as `grokit run` does it (checksums verified by the readers), then without.
        self.assertRegex(rows["shard load (page cache)"], r"GB/s, [1-8] readers, checksums")
        self.assertRegex(rows["readers' time in XXH3"], r" \d+ %")
        self.assertGreater(float(rows["without checksums"].split()[-1]), 0, p.stdout)
        # Mapped (--loader mapped): the host backend registers anything, so it runs here.
        self.assertRegex(rows["shard load (mapped)"], r"GB/s, [1-8] readers, checksums")
        self.assertRegex(rows["in host_register"], r" \d+ %")
        self.assertGreater(float(rows["without checksums (mapped)"].split()[-1]), 0, p.stdout)
        for what in ("decode step, int8, batch 1", "decode step, int4, batch 1", "prefill 80 tokens, int8",
                     "shard load (page cache)", "shard load (mapped)"):
            ratio = float(rows[what].split()[-3])  # ... ratio ">=" target
            self.assertGreater(ratio, 0, rows[what])
        self.assertGreater(float(rows["the same load"].split()[-1]), 0, rows["the same load"])  # vs the file read
        # The int8 step again with the backend's overlapped launches off (GROKIT_CUDA_PDL=0).
        self.assertIn("int8, launches serialized", rows, p.stdout)
        self.assertGreater(float(rows["int8, launches serialized"].split()[-1]), 0, p.stdout)
        # The prefill's op-by-op breakdown: every op of the layer, fractions of their sum.
        ops = ["q, k, v", "rope and cache", "attention", "output projection", "router", "expert gate",
               "expert up, gelu", "expert down", "combine, residual, norms"]
        for what in ops:
            self.assertIn(what, rows, p.stdout)
            self.assertIn("ms", rows[what])
        parts = [float(line.split()[-1]) for line in lines[1:] if "of the op sum" in line]
        self.assertGreaterEqual(len(parts), len(ops), p.stdout)
        self.assertAlmostEqual(sum(parts), 1.0, delta=0.01 * len(parts), msg=p.stdout)
        self.assertEqual([f for f in os.listdir(self.tmp) if f.startswith("grokit-bench-load")], [])

    def test_bench_device_parts_and_sweep(self):
        p = run("bench-device", "--device", "host", "--small", "--context", 16, "--reps", 1, "--steps", 1,
                "--only", "decode", "--sweep", "--work", self.tmp)
        self.assertEqual(p.returncode, 0, p.stderr)
        sweep = [line for line in p.stdout.splitlines() if line.startswith("sweep ")]
        # Two schemes x four products x (the plan's own + the three fastest).
        self.assertEqual(len(sweep), 2 * 4 * 4, p.stdout)
        self.assertTrue(all("GB/s" in line and "of read" in line for line in sweep), p.stdout)
        self.assertIn("the plan's own", sweep[0])
        rows = [line[:30].strip() for line in p.stdout.splitlines() if not line.startswith("sweep ")]
        self.assertIn("decode step, int8, batch 1", rows)
        self.assertNotIn("prefill 4096 tokens, int8", rows)
        self.assertFalse(any(r.startswith("shard load") for r in rows), p.stdout)
        bad = run("bench-device", "--device", "host", "--small", "--only", "decode,everything")
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertIn("unknown part 'everything'", bad.stderr)


if __name__ == "__main__":
    unittest.main()
