"""The grokit command line: help, bad arguments, refusals, pre-write checks on the real
model's sizes (sparse files), and the run-time-loaded CUDA backend."""
import ctypes
import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import numpy as np

from e2e_util import GROKIT, files_of, run, tiny_config, write_checkpoint

COMMANDS = ["convert", "inspect", "verify", "validate tensors", "devices", "run", "logits",
            "validate logits", "bench", "quantize"]


def parse_profile(text, per):
    """The table of --profile: {op: (ms, MiB read per `per`, 0 for ops that read no weights)}."""
    rows = re.findall(r"^  (\S+) +([0-9.]+) ms +[0-9.]+ %(?: +[0-9.]+ GB/s +\(([0-9.]+) MiB per " + per + r"\))?$",
                      text, re.M)
    return {op: (float(ms), float(mib) if mib else 0.0) for op, ms, mib in rows}


class Binary(unittest.TestCase):
    def test_links_no_cuda_library(self):
        out = subprocess.run(["ldd", GROKIT], capture_output=True, text=True, check=True).stdout
        for lib in ("libcudart", "libcuda.so", "libnccl", "libcublas"):
            self.assertNotIn(lib, out)

    def test_devices_without_gpu_says_why(self):
        p = run("devices")
        if p.returncode == 0:
            self.assertRegex(p.stdout, r"cuda:0 ")  # a GPU machine lists its devices
        else:
            self.assertEqual(p.returncode, 1)
            self.assertRegex(p.stderr, r"CUDA (is not usable|backend is not installed)")
            try:
                ctypes.CDLL("libcuda.so.1")
            except OSError:  # no driver at all: said so, not as a driver too old for the runtime
                if "backend is not installed" not in p.stderr:
                    self.assertIn("no NVIDIA driver is installed (libcuda.so.1 cannot be loaded: ", p.stderr)

    def test_help_lists_every_flag_with_default(self):
        for cmd in COMMANDS:
            p = run(*cmd.split(), "--help", check=0)
            blocks = []  # one per option; cxxopts wraps long descriptions onto more lines
            for line in p.stdout.splitlines():
                if re.match(r"^ {2,8}(-\w, )?--[a-z]", line):  # wrapped text is indented deeper
                    blocks.append(line)
                elif blocks and line.startswith("          "):
                    blocks[-1] += " " + line.strip()
            for block in blocks:
                if "--help" not in block:
                    self.assertIn("default:", block, f"{cmd}: {block.strip()}")

    def test_bad_arguments_exit_2_with_usage(self):
        cases = [["nonsense"], [], ["convert"], ["convert", "a"], ["convert", "a", "b", "--tp", "3"],
                 ["convert", "a", "b", "--bogus"], ["verify"], ["inspect", "a", "b"],
                 ["validate"], ["validate", "things"], ["validate", "tensors", "a"],
                 ["convert", "a", "b", "--resume", "--force"], ["verify", "x", "--threads", "0"]]
        for args in cases:
            p = run(*args)
            self.assertEqual(p.returncode, 2, f"{args}: {p.stderr}")
            self.assertRegex(p.stderr, r"(?i)usage|must|expected|unknown|contradict", str(args))


class Convert(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-cli-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(layers=2))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def out(self, name):
        p = os.path.join(self.tmp, name)
        shutil.rmtree(p, ignore_errors=True)
        return p

    def test_refuses_to_overwrite_then_force_replaces(self):
        out = self.out("m")
        run("convert", self.ckpt, out, "--tp", 2, "--no-progress", check=0)
        before = files_of(out)
        p = run("convert", self.ckpt, out, "--tp", 2, "--no-progress")
        self.assertEqual(p.returncode, 1)
        self.assertIn("refusing to overwrite", p.stderr)
        self.assertEqual(files_of(out), before)
        p = run("convert", self.ckpt, out, "--tp", 2, "--resume", "--no-progress", check=0)
        self.assertIn("already complete", p.stderr)
        run("convert", self.ckpt, out, "--tp", 4, "--force", "--no-progress", check=0)
        self.assertIn("shard-00003-of-00004.gkt", os.listdir(out))
        self.assertNotIn("shard-00000-of-00002.gkt", os.listdir(out))
        run("verify", out, "--no-progress", check=0)

    def test_tokenizer_is_read_before_the_output_is_cleared(self):
        # A tokenizer kept in the output directory survives --force, and a wrong path stops
        # the run before the old model is touched (or the whole checkpoint converted).
        out = self.out("tok")
        tok = os.path.join(self.tmp, "tok.model")
        with open(tok, "wb") as f:
            f.write(b"tokenizer bytes")
        run("convert", self.ckpt, out, "--tp", 2, "--tokenizer", tok, "--no-progress", check=0)
        own = os.path.join(out, "tokenizer.model")
        p = run("convert", self.ckpt, out, "--tp", 1, "--tokenizer", own, "--force", "--no-progress", check=0)
        self.assertIn("shard-00000-of-00001.gkt", os.listdir(out))
        with open(own, "rb") as f:
            self.assertEqual(f.read(), b"tokenizer bytes")
        run("verify", out, "--no-progress", check=0)
        before = files_of(out)
        missing = os.path.join(self.tmp, "no-such-tokenizer.model")
        p = run("convert", self.ckpt, out, "--tp", 2, "--tokenizer", missing, "--force", "--no-progress")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(missing + ": cannot stat", p.stderr)
        self.assertNotIn("plan:", p.stderr)  # before the checkpoint was even indexed
        self.assertEqual(files_of(out), before)

    def test_refuses_a_foreign_directory(self):
        out = self.out("foreign")
        os.makedirs(out)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("mine")
        p = run("convert", self.ckpt, out, "--tp", 1)
        self.assertEqual(p.returncode, 1)
        self.assertIn("not empty", p.stderr)
        self.assertEqual(os.listdir(out), ["notes.txt"])

    def test_dry_run_writes_nothing(self):
        out = self.out("dry")
        p = run("convert", self.ckpt, out, "--tp", 2, "--dry-run", check=0)
        self.assertIn("plan:", p.stderr)
        self.assertFalse(os.path.exists(out))

    def test_says_where_the_config_came_from(self):
        p = run("convert", self.ckpt, self.out("c1"), "--tp", 1, "--dry-run", check=0)
        self.assertIn("config: " + os.path.join(os.path.dirname(self.ckpt), "config.json"), p.stderr)
        # Without config.json the built-in Grok-1 config applies: 770 files expected.
        bare = os.path.join(self.tmp, "bare")
        shutil.rmtree(bare, ignore_errors=True)
        shutil.copytree(self.ckpt, os.path.join(bare, "ckpt-0"))
        p = run("convert", os.path.join(bare, "ckpt-0"), self.out("c2"), "--tp", 1, "--dry-run")
        self.assertEqual(p.returncode, 1)
        self.assertIn("built-in Grok-1", p.stderr)
        self.assertRegex(p.stderr, r"expects 770 tensor files; \d+ missing: tensor000\d\d_000")

    def test_unknown_config_key_is_an_error(self):
        cfg = os.path.join(self.tmp, "bad.json")
        with open(cfg, "w") as f:
            f.write('{"num_layer": 2}')
        p = run("convert", self.ckpt, self.out("c3"), "--tp", 1, "--config", cfg)
        self.assertEqual(p.returncode, 1)
        self.assertIn("unknown config key 'num_layer'", p.stderr)

    def test_tp_that_does_not_split_is_refused(self):
        cfg = os.path.join(self.tmp, "c.json")
        with open(cfg, "w") as f:
            f.write('{"vocab_size": 512, "emb_size": 128, "key_size": 16, "num_q_heads": 8,'
                    ' "num_kv_heads": 8, "num_layers": 2, "widening_factor": 3}')
        p = run("convert", self.ckpt, self.out("c4"), "--tp", 16, "--config", cfg)
        self.assertEqual(p.returncode, 1)
        self.assertIn("num_q_heads 8 does not split evenly", p.stderr)

    def test_incomplete_model_is_refused_by_every_reader(self):
        out = self.out("inc")
        run("convert", self.ckpt, out, "--tp", 2, "--no-progress", check=0)
        os.remove(os.path.join(out, "manifest.json"))
        for args in (["verify", out], ["inspect", out], ["validate", "tensors", self.ckpt, out]):
            p = run(*args)
            self.assertEqual(p.returncode, 1, args)
            self.assertIn("incomplete conversion", p.stderr)

    def test_bench_reports_each_round_against_its_own_bandwidth(self):
        out = self.out("bench")
        run("convert", self.ckpt, out, "--tp", 2, "--no-progress", check=0)
        p = run("bench", out, "--steps", 3, "--rounds", 2, "--buffer-mb", 16, "--threads", 2, check=0)
        # Each round: the weights' own pages (the headline) and a fresh buffer.
        rounds = re.findall(r"^round (\d): read bandwidth +([0-9.]+) GB/s \(the weights' pages; a fresh buffer "
                            r"([0-9.]+)\), 2 threads, decode step +([0-9.]+) ms, ratio ([0-9.]+) "
                            r"\(against the buffer ([0-9.]+)\)$", p.stdout, re.M)
        self.assertEqual([r[0] for r in rounds], ["1", "2"], p.stdout)
        per_token = re.search(r"weights read per token: +([0-9.]+) MiB", p.stdout)
        self.assertIsNotNone(per_token, p.stdout)
        for _, bw, buffer_bw, ms, ratio, buffer_ratio in rounds:
            # each ratio is its own round's (bytes / bandwidth) / step
            for b, r in ((bw, ratio), (buffer_bw, buffer_ratio)):
                expect = float(per_token.group(1)) * 2**20 / (float(b) * 1e9) / (float(ms) * 1e-3)
                # what the printed digits allow: the ratio's, the bandwidth's and the step's
                mib = float(per_token.group(1))
                slack = 0.006 + expect * (0.0006 / mib + 0.006 / float(b) + 0.0006 / float(ms) + 0.01)
                self.assertAlmostEqual(float(r), expect, delta=slack)
        self.assertRegex(p.stdout, r"against a fresh buffer \([0-9.]+ - [0-9.]+ GB/s\): median [0-9.]+")
        prefill = re.search(r"^prompt \(prefill\) +: +(\d+) tokens in ([0-9.]+) ms -> ([0-9.]+) tok/s$", p.stdout, re.M)
        self.assertIsNotNone(prefill, p.stdout)
        self.assertEqual(prefill.group(1), "16")  # the default --prompt-tokens
        ms, rate = float(prefill.group(2)), float(prefill.group(3))
        # what the printed digits allow: 0.005 of the ms, 0.05 of the rate
        self.assertAlmostEqual(rate, 16 / (ms * 1e-3), delta=0.06 + rate * 0.0051 / (ms - 0.005))
        self.assertRegex(p.stdout, r"roofline ratio +: +[0-9.]+ \(median of the rounds")
        self.assertRegex(p.stderr, r"grokit bench: [0-9.]+ tok/s, roofline [0-9.]+")
        self.assertEqual(run("bench", out, "--rounds", 0).returncode, 2)

    def test_bench_profile_accounts_for_the_steps_and_their_weights(self):
        out = self.out("bench-profile")
        run("convert", self.ckpt, out, "--tp", 2, "--no-progress", check=0)
        p = run("bench", out, "--steps", 4, "--rounds", 2, "--buffer-mb", 16, "--threads", 2, "--profile", check=0)
        head = re.search(r"^profile \(rank 0, mean per decode step over 8 steps, the steps as timed ([0-9.]+) ms\):$",
                         p.stdout, re.M)
        self.assertIsNotNone(head, p.stdout)
        ops = parse_profile(p.stdout, "step")
        for op in ("attn.qkv", "attention", "attn.output", "all-reduce", "router", "moe.gate+up", "moe.gelu", "moe.down",
                   "logits.product", "all-gather"):
            self.assertIn(op, ops, p.stdout)
        # The products read, per step, rank 0's share of the bytes a token reads: the
        # output projection whole (rank 0's vocabulary rows), two experts, every attention
        # matrix; the norms (fp32 vectors) are all that is left out.
        per_token = float(re.search(r"weights read per token: +([0-9.]+) MiB", p.stdout).group(1))
        products = sum(mib for _, mib in ops.values())
        self.assertGreater(products, 0.0)
        self.assertAlmostEqual(products * 2, per_token, delta=0.02 * per_token + 0.004)
        # The ops' times add up to the steps' (the clock laps cover the whole step). This
        # model's step is a fraction of a millisecond, so the hand-offs between the two
        # ranks' threads, outside rank 0's laps, weigh: on a loaded 2-core host (ctest -j2)
        # they took 33 % of it once; a lap left out would still fall below half.
        total = re.search(r"^  all ops +([0-9.]+) ms$", p.stdout, re.M)
        self.assertIsNotNone(total, p.stdout)
        self.assertLessEqual(float(total.group(1)), float(head.group(1)) * 1.001 + 0.002)
        self.assertGreater(float(total.group(1)), float(head.group(1)) * 0.5)
        self.assertAlmostEqual(sum(ms for ms, _ in ops.values()) - float(total.group(1)), 0.0,
                               delta=0.001 * len(ops) + 0.001)
        self.assertEqual(run("bench", out, "--device", "host", "--profile").returncode, 2)

    def test_run_and_logits_profile_on_stderr(self):
        out = self.out("run-profile")
        run("convert", self.ckpt, out, "--tp", 2, "--no-progress", check=0)
        toks = os.path.join(self.tmp, "profile-tokens.npy")
        np.save(toks, np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], dtype=np.int32))
        p = run("run", out, "--tokens-in", toks, "--max-tokens", 3, "--ignore-eos", "--temperature", 0, "--profile",
                "--no-progress", check=0)
        self.assertIn("grokit run: profile (rank 0, totals of the run):", p.stderr)
        ops = parse_profile(p.stderr, "run")
        self.assertIn("moe.gate+up", ops, p.stderr)
        self.assertGreater(ops["logits.product"][1], 0.0)
        self.assertNotIn("profile", p.stdout)  # the payload stays clean
        lg = run("logits", out, "--tokens", toks, "--out", os.path.join(self.tmp, "profile-logits.npy"), "--force",
                 "--profile", "--no-progress", check=0)
        self.assertIn("grokit logits: profile (rank 0, totals of the run):", lg.stderr)
        self.assertRegex(lg.stderr, r"(?m)^  all ops +[0-9.]+ ms$")
        # Without --profile, no table.
        self.assertNotIn("profile", run("logits", out, "--tokens", toks, "--out", os.path.join(self.tmp, "p2.npy"),
                                        "--force", "--no-progress", check=0).stderr)


class Options(unittest.TestCase):
    """--compress, --tokenizer and inspect --json, end to end."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-opt-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(layers=2))
        cls.tok = os.path.join(cls.tmp, "fake-tokenizer.model")
        with open(cls.tok, "wb") as f:
            f.write(b"not really a sentencepiece model, but bytes to carry" * 10)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_compressed_model_verifies_validates_and_is_deterministic(self):
        outs = [os.path.join(self.tmp, f"z{i}") for i in range(2)]
        for out in outs:
            run("convert", self.ckpt, out, "--tp", 2, "--compress", "--no-progress", check=0)
        self.assertEqual(files_of(outs[0]), files_of(outs[1]))
        raw = os.path.join(self.tmp, "raw")
        run("convert", self.ckpt, raw, "--tp", 2, "--no-progress", check=0)
        size = lambda d: sum(len(v) for v in files_of(d).values())
        self.assertLess(size(outs[0]), size(raw))
        run("verify", outs[0], "--no-progress", check=0)
        run("validate", "tensors", self.ckpt, outs[0], "--no-progress", check=0)
        info = json.loads(run("inspect", outs[0], "--json", check=0).stdout)
        comp = {t["compression"] for r in info["ranks"] for t in r["tensors"]}
        self.assertEqual(comp, {"zstd"})

    def test_tokenizer_is_carried_and_checked(self):
        out = os.path.join(self.tmp, "tok")
        run("convert", self.ckpt, out, "--tp", 1, "--tokenizer", self.tok, "--no-progress", check=0)
        info = json.loads(run("inspect", out, "--json", check=0).stdout)
        self.assertEqual(info["tokenizer"]["file"], "tokenizer.model")
        self.assertEqual(info["tokenizer"]["size"], os.path.getsize(self.tok))
        self.assertEqual(info["tensor_parallel"], 1)
        self.assertEqual(info["tensor_count"], 2 + 12 * 2)
        self.assertEqual(info["derived"]["output_multiplier_bf16"], 0.578125)
        run("verify", out, "--no-progress", check=0)
        path = os.path.join(out, "tokenizer.model")
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[10] ^= 0x01
        with open(path, "wb") as f:
            f.write(data)
        p = run("verify", out, "--no-progress")
        self.assertEqual(p.returncode, 1)
        self.assertIn("tokenizer checksum mismatch", p.stdout)


class RealSizes(unittest.TestCase):
    """Grok-1's 770 files at their real sizes as sparse files (all-zero payloads)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-g1-")
        import make_checkpoint
        cfg = make_checkpoint.make_config(**make_checkpoint.PRESETS["grok-1"])
        try:
            cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "g1"), cfg, sparse=True)
        except OSError as e:  # a filesystem without sparse files
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise unittest.SkipTest(f"cannot write 318 GB of sparse files here: {e}")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_checks_pass_and_plan_is_printed(self):
        p = run("convert", self.ckpt, os.path.join(self.tmp, "m"), "--tp", 8, "--dry-run", check=0)
        self.assertIn("plan: 770 tensors", p.stderr)

    def test_truncated_download_is_named(self):
        victim = os.path.join(self.ckpt, "tensor00100_000")
        size = os.path.getsize(victim)
        os.truncate(victim, size - 1)
        try:
            p = run("convert", self.ckpt, os.path.join(self.tmp, "m"), "--tp", 8, "--dry-run")
        finally:
            os.truncate(victim, size)
        self.assertEqual(p.returncode, 1)
        self.assertIn("tensor00100_000", p.stderr)
        self.assertIn("truncated download", p.stderr)

    def test_payload_beyond_4_gib(self):
        """An embedding of 6.4 GB (BINBYTES8; the pickle's tail lies past 2^32)."""
        import make_checkpoint
        sizes = dict(make_checkpoint.PRESETS["bench-slice"], vocab=262144)
        d = os.path.join(self.tmp, "big")
        ckpt = write_checkpoint(d, make_checkpoint.make_config(**sizes), sparse=True)
        self.assertGreater(os.path.getsize(os.path.join(ckpt, "tensor00000_000")), 2**32)
        p = run("convert", ckpt, os.path.join(self.tmp, "mbig"), "--tp", 8, "--dry-run", check=0)
        self.assertIn("plan: 14 tensors", p.stderr)
        shutil.rmtree(d)

    def test_missing_file_is_named(self):
        victim = os.path.join(self.ckpt, "tensor00042_000")
        os.rename(victim, victim + ".away")
        try:
            p = run("convert", self.ckpt, os.path.join(self.tmp, "m"), "--tp", 8)
        finally:
            os.rename(victim + ".away", victim)
        self.assertEqual(p.returncode, 1)
        self.assertIn("1 missing: tensor00042_000", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "m", "manifest.json")))


if __name__ == "__main__":
    unittest.main()
