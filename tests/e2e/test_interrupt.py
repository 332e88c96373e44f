"""Interruption: grokit convert killed with SIGKILL at random points, resumed each time
with --resume, ends byte-identical to an uninterrupted conversion; an interrupted
directory is never accepted as complete. grokit quantize killed likewise leaves a
directory that is refused as incomplete and named so until --force starts it over."""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from e2e_util import GROKIT, SOURCE_DIR, files_of, run, tiny_config, write_checkpoint

sys.path.insert(0, os.path.join(SOURCE_DIR, "tests", "python"))
import grokit_format  # noqa: E402

KILLS = 24  # interrupted runs wanted, at least


class Interruption(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-kill-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(emb=384, layers=12))
        cls.ref = os.path.join(cls.tmp, "ref")
        t0 = time.monotonic()
        run("convert", cls.ckpt, cls.ref, "--tp", 4, "--threads", 2, "--no-progress", check=0)
        cls.full_seconds = time.monotonic() - t0

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def assert_not_accepted(self, out):
        for args in (["verify", out, "--no-progress"], ["inspect", out]):
            p = run(*args)
            self.assertEqual(p.returncode, 1, f"{args}: an interrupted conversion was accepted")
            # Killed before any shard existed, the directory is merely not a model yet.
            self.assertRegex(p.stderr, r"no manifest.json: (this is an incomplete conversion|not a grokit model)|: not a directory")

    def test_kill_and_resume_is_byte_identical(self):
        rng = random.Random(20261129)
        reference = files_of(self.ref)
        out = os.path.join(self.tmp, "out")
        interrupted = rounds = 0
        while interrupted < KILLS and rounds < 30:
            rounds += 1
            shutil.rmtree(out, ignore_errors=True)
            for _ in range(200):
                cmd = [GROKIT, "convert", self.ckpt, out, "--tp", "4", "--threads", "2", "--staging-mb", "1",
                       "--no-progress", "--resume"]
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                time.sleep(rng.uniform(0, self.full_seconds * 0.8))
                was_running = p.poll() is None
                p.kill()
                _, err = p.communicate()
                if was_running and p.returncode == -9:
                    interrupted += 1
                    if not os.path.exists(os.path.join(out, "manifest.json")):
                        self.assert_not_accepted(out)
                else:
                    self.assertEqual(p.returncode, 0, err)
                    break
            run("convert", self.ckpt, out, "--tp", 4, "--resume", "--no-progress", check=0)
            self.assertEqual(files_of(out), reference, f"round {rounds}: output differs")
            self.assertFalse(os.path.exists(os.path.join(out, ".grokit-convert")))
        self.assertGreaterEqual(interrupted, KILLS, f"only {interrupted} kills landed in {rounds} rounds")
        run("verify", out, "--no-progress", check=0)

    def test_writes_through_the_page_cache_give_the_same_files(self):
        """--no-direct-io changes how the shards reach the disk, not a byte of them."""
        out = os.path.join(self.tmp, "buffered")
        shutil.rmtree(out, ignore_errors=True)
        run("convert", self.ckpt, out, "--tp", 4, "--threads", 2, "--staging-mb", 1, "--no-direct-io",
            "--no-progress", check=0)
        self.assertEqual(files_of(out), files_of(self.ref))

    def test_resume_recheck_redoes_a_damaged_kept_tensor(self):
        """A tensor the journal says is done, but whose bytes were damaged, is redone."""
        out = os.path.join(self.tmp, "damaged")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [GROKIT, "convert", self.ckpt, out, "--tp", "4", "--threads", "1", "--staging-mb", "1", "--no-progress"]
        state = os.path.join(out, ".grokit-convert")
        partial = os.path.join(state, "shard-00000-of-00004.gkt")
        for delay in (0.6, 0.5, 0.4, 0.3, 0.2, 0.7, 0.1):  # stop it part way, with some tensors done
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            time.sleep(self.full_seconds * delay)
            p.kill()
            p.wait()
            # Some tensors journaled, and the shard still partial: a kill during the
            # finalization (which renames the shards out of the state directory) or
            # before the first tensor does not count.
            if (os.path.exists(partial) and os.path.getsize(os.path.join(state, "journal")) > 24 + 100
                    and not os.path.exists(os.path.join(out, "manifest.json"))):
                break
        else:
            self.skipTest("could not stop the conversion part way on this machine")
        # The partial shard has the final layout (its header is written last): take the
        # first tensor's place from the reference shard and damage a byte of it.
        ref_shard = grokit_format.read_shard(os.path.join(self.ref, "shard-00000-of-00004.gkt"), verify=False)
        at = ref_shard.header["data_offset"] + ref_shard.entries[0]["offset"] + 100
        with open(partial, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
        p = run("convert", self.ckpt, out, "--tp", 4, "--resume", "--no-progress", check=0)
        self.assertRegex(p.stderr, r"resume: \d+ tensors kept after re-checking their checksums, [1-9]\d* to redo")
        self.assertEqual(files_of(out), files_of(self.ref))

    def test_killed_quantize_is_refused_until_forced(self):
        rng = random.Random(20261202)
        q_ref = os.path.join(self.tmp, "q-ref")
        shutil.rmtree(q_ref, ignore_errors=True)
        t0 = time.monotonic()
        run("quantize", self.ref, q_ref, "--scheme", "int4", "--group-size", 32, "--threads", 2, "--no-progress",
            check=0)
        seconds = time.monotonic() - t0
        out = os.path.join(self.tmp, "q-killed")
        interrupted = with_state = 0
        for _ in range(40):
            shutil.rmtree(out, ignore_errors=True)
            cmd = [GROKIT, "quantize", self.ref, out, "--scheme", "int4", "--group-size", "32", "--threads", "2",
                   "--no-progress"]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(seconds * 0.1, seconds * 0.8))
            was_running = p.poll() is None
            p.kill()
            _, err = p.communicate()
            if not (was_running and p.returncode == -9):
                continue
            if os.path.exists(os.path.join(out, "manifest.json")) or not os.path.isdir(out):
                continue  # killed after the commit point, or before the directory existed
            interrupted += 1
            if os.path.exists(os.path.join(out, ".grokit-quantize")):
                with_state += 1
                for args in (["verify", out, "--no-progress"], ["inspect", out]):
                    p = run(*args)
                    self.assertEqual(p.returncode, 1, f"{args}: an interrupted quantization was accepted")
                    self.assertIn("this is an incomplete quantization (interrupted?); run 'grokit quantize' again "
                                  "with --force", p.stderr)
                p = run("quantize", self.ref, out, "--scheme", "int4", "--group-size", 32, "--no-progress")
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn("holds an interrupted quantization (.grokit-quantize); pass --force to start over",
                              p.stderr)
            run("quantize", self.ref, out, "--scheme", "int4", "--group-size", 32, "--force", "--no-progress",
                check=0)
            self.assertEqual(files_of(out), files_of(q_ref))
            if with_state >= 4:
                break
        self.assertGreaterEqual(with_state, 4, f"could not stop quantize part way on this machine ({interrupted} kills)")


if __name__ == "__main__":
    unittest.main()
