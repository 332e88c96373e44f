"""Full disks: converting (and quantizing) under a file-size limit (prlimit --fsize) or onto a filesystem
that is too small fails with a clear error and leaves nothing that looks complete; once
there is room, --resume finishes with the same bytes as an unhindered conversion."""
import os
import shutil
import subprocess
import tempfile
import unittest

from e2e_util import GROKIT, files_of, run, tiny_config, write_checkpoint


class FullDisk(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-full-")
        cls.ckpt = write_checkpoint(os.path.join(cls.tmp, "ck"), tiny_config(emb=256, layers=4))
        cls.ref = os.path.join(cls.tmp, "ref")
        run("convert", cls.ckpt, cls.ref, "--tp", 2, "--no-progress", check=0)
        cls.shard_size = os.path.getsize(os.path.join(cls.ref, "shard-00000-of-00002.gkt"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_file_size_limit(self):
        if shutil.which("prlimit") is None:
            self.skipTest("prlimit (util-linux) is not installed")
        out = os.path.join(self.tmp, "fsize")
        limit = self.shard_size // 3
        p = subprocess.run(["prlimit", f"--fsize={limit}", GROKIT, "convert", self.ckpt, out, "--tp", "2",
                            "--no-progress"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("file size limit", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "manifest.json")))
        v = run("verify", out, "--no-progress")
        self.assertEqual(v.returncode, 1)
        self.assertIn("incomplete conversion", v.stderr)
        run("convert", self.ckpt, out, "--tp", 2, "--resume", "--no-progress", check=0)
        self.assertEqual(files_of(out), files_of(self.ref))

    def test_quantize_under_a_file_size_limit(self):
        """The failed write stops every thread of the quantize pipeline: a clear error, no
        manifest, and the output directory is not taken for a model."""
        if shutil.which("prlimit") is None:
            self.skipTest("prlimit (util-linux) is not installed")
        out = os.path.join(self.tmp, "q-fsize")
        p = subprocess.run(["prlimit", f"--fsize={self.shard_size // 8}", GROKIT, "quantize", self.ref, out,
                            "--scheme", "bf16", "--threads", "3", "--no-progress"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("file size limit", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "manifest.json")))
        v = run("verify", out, "--no-progress")
        self.assertEqual(v.returncode, 1)

    def test_small_filesystem(self):
        """A tmpfs in a private mount namespace: too small, then grown."""
        if shutil.which("unshare") is None:
            self.skipTest("unshare (util-linux) is not installed")
        mnt = os.path.join(self.tmp, "mnt")
        copy = os.path.join(self.tmp, "from-small-fs")
        logs = os.path.join(self.tmp, "logs")
        os.makedirs(mnt)
        os.makedirs(logs)
        small_kib = max(64, self.shard_size // 1024)  # room for about one of the two shards
        script = f"""
set -u
mount -t tmpfs -o size={small_kib}k grokit-test {mnt} || exit 77
"{GROKIT}" convert "{self.ckpt}" "{mnt}/m" --tp 2 --no-progress 2> "{logs}/full.txt"
echo $? > "{logs}/full.rc"
ls -a "{mnt}/m" > "{logs}/after-full.txt" 2>&1
"{GROKIT}" verify "{mnt}/m" --no-progress 2> "{logs}/verify.txt"; echo $? > "{logs}/verify.rc"
mount -o remount,size=64m {mnt} || exit 78
"{GROKIT}" convert "{self.ckpt}" "{mnt}/m" --tp 2 --resume --no-progress 2> "{logs}/resume.txt"
echo $? > "{logs}/resume.rc"
cp -r "{mnt}/m" "{copy}"
"""
        p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                           capture_output=True, text=True)
        if p.returncode in (77, 78) or "unshare failed" in p.stderr or "Operation not permitted" in p.stderr:
            self.skipTest(f"cannot mount a private tmpfs here: {p.stderr.strip()[:200]}")

        def read(name):
            with open(os.path.join(logs, name)) as f:
                return f.read().strip()

        self.assertEqual(read("full.rc"), "1", read("full.txt"))
        self.assertRegex(read("full.txt"), r"not enough free space|disk is full")
        self.assertNotIn("manifest.json", read("after-full.txt"))
        self.assertEqual(read("verify.rc"), "1")
        self.assertEqual(read("resume.rc"), "0", read("resume.txt"))
        self.assertEqual(files_of(copy), files_of(self.ref))


if __name__ == "__main__":
    unittest.main()
