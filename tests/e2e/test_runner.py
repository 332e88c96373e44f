"""grokit logits and grokit run against scripts/reference.py (the independent NumPy forward
pass) on a tiny 12-layer checkpoint: logits at TP 1/2/4/8, hidden states, greedy
generation, batching, sampling and the text front end (a full 8192-token context:
test_long_context.py).

grokit follows the reference's fp32 conventions (the pinned accumulation orders, and the
chains and tree in which tensor-parallel partial sums meet), so at every TP degree its
logits and hidden states are bit-identical to the reference's on these checkpoints."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import ml_dtypes
import numpy as np

from e2e_util import GROKIT, SOURCE_DIR, files_of, run, tiny_config, write_checkpoint

SCRIPTS = os.path.join(SOURCE_DIR, "scripts")
REFERENCE_PY = os.path.join(SCRIPTS, "reference.py")
import reference  # noqa: E402  (e2e_util puts scripts/ on sys.path)

BF16 = np.dtype(ml_dtypes.bfloat16)
TPS = (1, 2, 4, 8)
NEAR_TIE = 0.1          # grokit validate logits' default --near-tie-margin
GREEDY_N = 16
NEWLINE_ID, NUL_ID = 14, 4  # the byte pieces <0x0A> and <0x00> of make_tokenizer's model


def python(*args, check=True):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: rc {p.returncode}\n{p.stderr}")
    return p


def real_lengths(tokens):
    return [int(np.argmin(r > 0)) if (r == 0).any() else len(r) for r in tokens]


def top2_margin(logits):
    top = np.sort(logits.astype(np.float64))
    return float(top[-1] - top[-2])


def bf16_identical_fraction(a, b, mask):
    """Fraction of the elements at the real positions (mask [B, T]) whose bf16 values agree."""
    same = a.astype(BF16) == b.astype(BF16)
    return float(same[mask].mean())


def escape_line(raw):
    """grokit run's batch escaping: backslash, \\n, \\r, \\t, other control bytes as \\xNN."""
    out = bytearray()
    for c in raw:
        if c == 0x5C:
            out += b"\\\\"
        elif c == 0x0A:
            out += b"\\n"
        elif c == 0x0D:
            out += b"\\r"
        elif c == 0x09:
            out += b"\\t"
        elif c < 0x20 or c == 0x7F:
            out += b"\\x%02x" % c
        else:
            out.append(c)
    return bytes(out)


def run_bytes(*args):
    """grokit with args; stdout and stderr as bytes (to check the encoding ourselves)."""
    return subprocess.run([GROKIT, *map(str, args)], capture_output=True)


class Runner(unittest.TestCase):
    """One tiny 12-layer checkpoint, its TP 1/2/4/8 conversions (with a trained tokenizer),
    a [3, 40] token file (rows 1 and 2 right-padded), the reference's logits, hidden states
    and greedy tokens for it."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="grokit-runner-")
        cls.ck_dir = os.path.join(cls.tmp, "ck")
        cls.ckpt = write_checkpoint(cls.ck_dir, tiny_config(), seed=0)
        cls.tokenizer = os.path.join(cls.tmp, "tok.model")
        python(os.path.join(SCRIPTS, "make_tokenizer.py"), os.path.join(cls.tmp, "tok"),
               "--vocab-size", 512)
        cls.model = {}
        for tp in TPS:
            cls.model[tp] = os.path.join(cls.tmp, f"m{tp}")
            run("convert", cls.ckpt, cls.model[tp], "--tp", tp, "--tokenizer", cls.tokenizer,
                "--no-progress", check=0)
        cls.model_notok = os.path.join(cls.tmp, "m-notok")  # no tokenizer.model beside ckpt-0
        run("convert", cls.ckpt, cls.model_notok, "--tp", 1, "--no-progress", check=0)

        rng = np.random.default_rng(1234)
        cls.tokens = rng.integers(3, 512, size=(3, 40)).astype(np.int32)
        cls.tokens[1, 28:] = 0
        cls.tokens[2, 17:] = 0
        cls.mask = cls.tokens > 0
        cls.tokens_path = cls.path("tokens.npy")
        np.save(cls.tokens_path, cls.tokens)

        cls.ref_logits = cls.path("ref_logits.npy")
        cls.ref_hidden = cls.path("ref_hidden")
        cls.ref_greedy = cls.path("ref_greedy.npy")
        python(REFERENCE_PY, cls.ck_dir, "--tokens", cls.tokens_path, "--out", cls.ref_logits,
               "--dump-layers", cls.ref_hidden, "--greedy", GREEDY_N, "--greedy-out", cls.ref_greedy)
        cls.cfg, cls.params = reference.load_checkpoint(cls.ck_dir)

        cls.logits, cls.hidden = {}, {}
        for tp in TPS:
            cls.logits[tp] = cls.path(f"logits_tp{tp}.npy")
            cls.hidden[tp] = cls.path(f"hidden_tp{tp}")
            run("logits", cls.model[tp], "--tokens", cls.tokens_path, "--out", cls.logits[tp],
                "--dump-layers", cls.hidden[tp], "--no-progress", check=0)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def path(cls, name):
        return os.path.join(cls.tmp, name)

    def save_tokens(self, name, rows):
        """rows: lists of ids, right-padded with 0 into one int32 [B, T] file."""
        T = max(len(r) for r in rows)
        a = np.zeros((len(rows), T), np.int32)
        for i, r in enumerate(rows):
            a[i, :len(r)] = r
        p = self.path(name)
        np.save(p, a)
        return p

    def generate(self, tp, tokens_path, out_name, *flags):
        out = self.path(out_name)
        run("run", self.model[tp], "--tokens-in", tokens_path, "--tokens-out", out, "--force",
            "--no-progress", *flags, check=0)
        return np.load(out)

    def reference_next_logits(self, row, generated):
        """The reference's logits for the token after the real tokens of `row` + generated."""
        prefix = np.concatenate([row[row > 0], np.asarray(generated, np.int32)])[None]
        return reference.forward(self.cfg, self.params, prefix.astype(np.int32))[0, -1]

    # 1. ------------------------------------------------------------------------------
    def validate(self, ref, cand, *flags):
        """grokit validate logits --tokens (default thresholds) --json: (rc, report, text)."""
        p = run("validate", "logits", "--reference", ref, "--candidate", cand, "--tokens",
                self.tokens_path, "--json", "--no-progress", *flags)
        self.assertIn(p.returncode, (0, 1), p.stderr)
        return p.returncode, json.loads(p.stdout), p.stderr

    def test_logits_match_the_reference_at_tp1_bit_for_bit(self):
        ref = np.load(self.ref_logits)
        rc, report, text = self.validate(self.ref_logits, self.logits[1])
        self.assertEqual(rc, 0, text)
        self.assertTrue(report["ok"])
        self.assertEqual(report["positions"], int(self.mask.sum()))
        self.assertLess(report["kl"]["mean"], 1e-4)
        got = np.load(self.logits[1])
        self.assertEqual((got.dtype, got.shape), (np.float32, ref.shape))
        diff = np.argwhere((got != ref).any(axis=-1) & self.mask)
        self.assertEqual(len(diff), 0, f"TP 1 logits differ at [b, t] {diff[:5].tolist()}")

    def test_logits_at_tp_2_4_8_match_the_reference_bit_for_bit(self):
        ref = np.load(self.ref_logits)
        for tp in TPS[1:]:
            with self.subTest(tp=tp):
                rc, report, text = self.validate(self.ref_logits, self.logits[tp])
                self.assertEqual(rc, 0, text)
                self.assertLess(report["kl"]["mean"], 1e-4)
                got = np.load(self.logits[tp])
                diff = np.argwhere((got != ref).any(axis=-1) & self.mask)
                self.assertEqual(len(diff), 0, f"TP {tp} logits differ at [b, t] {diff[:5].tolist()}")

    # 2. ------------------------------------------------------------------------------
    def test_hidden_states_at_tp1_are_bf16_identical(self):
        L = self.cfg["num_layers"]
        self.assertEqual(sorted(os.listdir(self.hidden[1])),
                         [f"experts_{i:03d}.npy" for i in range(L)] + [f"hidden_{i:03d}.npy" for i in range(L + 1)])
        for i in range(L):  # the routing taken, as the reference takes it
            name = f"experts_{i:03d}.npy"
            np.testing.assert_array_equal(np.load(os.path.join(self.hidden[1], name)),
                                          np.load(os.path.join(self.ref_hidden, name)), name)
        fractions = []
        for i in range(L + 1):
            name = f"hidden_{i:03d}.npy"
            ref, got = np.load(os.path.join(self.ref_hidden, name)), np.load(os.path.join(self.hidden[1], name))
            self.assertEqual(got.shape, ref.shape, name)
            fractions.append(bf16_identical_fraction(ref, got, self.mask))
        report = ", ".join(f"{i}: {f:.4f}" for i, f in enumerate(fractions))
        for i, f in enumerate(fractions):
            self.assertGreaterEqual(f, 0.99, f"hidden_{i:03d}: bf16-identical fractions per layer: {report}")

    # 3. ------------------------------------------------------------------------------
    def test_greedy_matches_the_reference_up_to_a_near_tie(self):
        """TP 1 against reference.py --greedy (which recomputes every step from scratch)."""
        ref = np.load(self.ref_greedy)
        self.assertEqual(ref.shape, (3, GREEDY_N))
        got = self.generate(1, self.tokens_path, "greedy_tp1.npy", "--max-tokens", GREEDY_N,
                            "--temperature", 0, "--ignore-eos")
        self.assertEqual(got.shape, ref.shape)
        for b in range(ref.shape[0]):
            with self.subTest(row=b):
                differ = np.flatnonzero(got[b] != ref[b])
                if len(differ) == 0:
                    continue
                s = int(differ[0])
                margin = top2_margin(self.reference_next_logits(self.tokens[b], ref[b, :s]))
                self.assertLess(margin, NEAR_TIE,
                                f"row {b}: greedy step {s} gives {got[b, s]}, the reference "
                                f"{ref[b, s]} with a clear top-2 margin {margin}\n"
                                f"grokit    {got[b].tolist()}\nreference {ref[b].tolist()}")

    def test_greedy_at_tp_2_4_8_matches_the_reference(self):
        ref = np.load(self.ref_greedy)
        for tp in TPS[1:]:
            got = self.generate(tp, self.tokens_path, f"greedy_tp{tp}.npy", "--max-tokens", GREEDY_N,
                                "--temperature", 0, "--ignore-eos")
            with self.subTest(tp=tp):
                np.testing.assert_array_equal(got, ref)

    # 4. ------------------------------------------------------------------------------
    def test_a_batch_equals_each_prompt_alone(self):
        rng = np.random.default_rng(4)
        rows = [rng.integers(3, 512, size=n).tolist() for n in (40, 9, 23)]
        batch = self.save_tokens("batch.npy", rows)
        singles = [self.save_tokens(f"single{i}.npy", [r]) for i, r in enumerate(rows)]
        modes = {"greedy": ["--temperature", 0],
                 "sampled": ["--temperature", 0.9, "--top-p", 0.9, "--seed", 7]}
        for tp in (1, 8):
            for mode, flags in modes.items():
                with self.subTest(tp=tp, mode=mode):
                    together = self.generate(tp, batch, f"b_{mode}.npy", "--max-tokens", 12, *flags)
                    for i, single in enumerate(singles):
                        alone = self.generate(tp, single, f"s_{mode}_{i}.npy", "--max-tokens", 12, *flags)
                        np.testing.assert_array_equal(together[i], alone[0], f"row {i}")

    # 6. ------------------------------------------------------------------------------
    def test_sampling_depends_on_the_seed_only(self):
        sample = ["--prompt", "The quick brown fox", "--max-tokens", 32, "--temperature", 1.0,
                  "--ignore-eos", "--no-progress"]
        a, b, c = (run_bytes("run", self.model[1], *sample, "--seed", s) for s in (1, 1, 2))
        for p in (a, b, c):
            self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(a.stdout, b.stdout)
        self.assertNotEqual(a.stdout, c.stdout)

    def test_tiny_temperature_is_greedy(self):
        """Equal up to the first exact tie of the top logits (bf16 logits tie exactly often on
        a 512-token vocabulary): argmax takes the lower id, a draw either of them."""
        n = 24
        greedy = self.generate(1, self.tokens_path, "t0.npy", "--max-tokens", n, "--temperature", 0,
                               "--ignore-eos")
        tiny = self.generate(1, self.tokens_path, "t1e-6.npy", "--max-tokens", n, "--temperature", 1e-6,
                             "--seed", 3, "--ignore-eos")
        for b in range(greedy.shape[0]):
            differ = np.flatnonzero(greedy[b] != tiny[b])
            if len(differ) == 0:
                continue
            s = int(differ[0])
            logits = self.reference_next_logits(self.tokens[b], greedy[b, :s])
            best = set(np.flatnonzero(logits == logits.max()).tolist())
            self.assertGreater(len(best), 1, f"row {b} step {s}: {tiny[b, s]} drawn at T=1e-6, "
                               f"greedy {greedy[b, s]}, and the top logit is not tied")
            self.assertIn(int(tiny[b, s]), best)

    # 7. ------------------------------------------------------------------------------
    def test_text_prompt_streams_utf8_and_a_summary(self):
        p = run_bytes("run", self.model[1], "--prompt", "Hello world", "--max-tokens", 8,
                      "--temperature", 0, "--no-progress")
        self.assertEqual(p.returncode, 0, p.stderr)
        text = p.stdout.decode("utf-8")  # strict: raises on invalid UTF-8
        self.assertTrue(text.endswith("\n"))
        self.assertGreater(len(text.rstrip("\n")), 0)
        err = p.stderr.decode("utf-8")
        self.assertIn("tok/s", err)
        self.assertIn("time to first token", err)
        # The same again: greedy text is deterministic.
        self.assertEqual(run_bytes("run", self.model[1], "--prompt", "Hello world", "--max-tokens", 8,
                                   "--temperature", 0, "--no-progress").stdout, p.stdout)

    def test_prompt_file_prints_one_line_per_prompt(self):
        f = self.path("prompts.txt")
        with open(f, "w") as fh:
            fh.write("Hello world\nThe answer to life is\nGood morning\n")
        p = run_bytes("run", self.model[1], "--prompt-file", f, "--max-tokens", 8, "--temperature", 0,
                      "--no-progress")
        self.assertEqual(p.returncode, 0, p.stderr)
        p.stdout.decode("utf-8")
        # Lines end at "\n" only (a continuation may hold a "\r", which splitlines() would cut).
        self.assertEqual(p.stdout.count(b"\n"), 3, p.stdout)
        self.assertTrue(p.stdout.endswith(b"\n"))

    def test_prompt_file_refuses_a_blank_line_between_prompts(self):
        flags = ["--max-tokens", 4, "--temperature", 0, "--no-progress"]
        # Output line i answers prompt i: a blank line in between would shift every later
        # answer if it were skipped, so it is refused, by its line number.
        f = self.path("prompts-gap.txt")
        with open(f, "w") as fh:
            fh.write("Hello world\n\nGood morning\n")
        p = run_bytes("run", self.model[1], "--prompt-file", f, *flags)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stdout, b"")
        self.assertIn(b"prompts-gap.txt line 2: empty, between prompts", p.stderr)
        # Blank lines after the last prompt are not prompts: two prompts, two lines out.
        f = self.path("prompts-tail.txt")
        with open(f, "w") as fh:
            fh.write("Hello world\r\nGood morning\n\n\r\n")
        p = run_bytes("run", self.model[1], "--prompt-file", f, *flags)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.count(b"\n"), 2, p.stdout)

    def test_prompt_file_from_standard_input_and_with_crlf_lines(self):
        f = self.path("prompts-lf.txt")
        with open(f, "w") as fh:
            fh.write("Hello world\nThe answer to life is\n")
        flags = ["--max-tokens", 8, "--temperature", 0, "--no-progress"]
        want = run_bytes("run", self.model[1], "--prompt-file", f, *flags)
        self.assertEqual(want.returncode, 0, want.stderr)
        # The same prompts on stdin ('-'), written with CRLF line ends: the same lines out.
        p = subprocess.run([GROKIT, "run", str(self.model[1]), "--prompt-file", "-", *map(str, flags)],
                           input=b"Hello world\r\nThe answer to life is\r\n", capture_output=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout, want.stdout)
        # Nothing on stdin: named as such, non-zero exit.
        p = subprocess.run([GROKIT, "run", str(self.model[1]), "--prompt-file", "-", *map(str, flags)],
                           input=b"", capture_output=True)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(b"standard input: no prompts", p.stderr)

    def test_tokenizer_flag_serves_a_model_converted_without_one(self):
        flags = ["--prompt", "Hello world", "--max-tokens", 8, "--temperature", 0, "--no-progress"]
        want = run_bytes("run", self.model[1], *flags)
        self.assertEqual(want.returncode, 0, want.stderr)
        p = run_bytes("run", self.model_notok, "--tokenizer", self.tokenizer, *flags)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout, want.stdout)
        # A tokenizer with more pieces than the model's vocabulary is refused, by name.
        big = self.path("tok-big")
        python(os.path.join(SCRIPTS, "make_tokenizer.py"), big, "--vocab-size", 600, "--force")
        p = run_bytes("run", self.model_notok, "--tokenizer", big + ".model", *flags)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(b"600 pieces, more than the model's vocabulary of 512", p.stderr)

    SPECIAL_PROMPTS = ["Hello world", "The answer to life is", "Good morning", "The quick brown fox",
                       "Call me Ishmael", "To be, or not to be", "It was the best of times",
                       "Numbers like 3.14", "What time is it?", "The cat sat on the mat"]
    SPECIAL_FLAGS = ["--max-tokens", 32, "--temperature", 1.0, "--ignore-eos", "--no-progress"]

    def _sampled_batch_with(self, wanted, what):
        """A seed for which the ids [10, 32] of a sampled 10-prompt batch satisfy the predicate
        `wanted`; (prompt file, seed, ids). The byte pieces are rare: a few seeds do."""
        f = self.path("prompts10.txt")
        with open(f, "w") as fh:
            fh.write("\n".join(self.SPECIAL_PROMPTS) + "\n")
        cache = type(self).__dict__.get("_special_cache")
        if cache is None:
            cache = type(self)._special_cache = {}
        for seed in range(40):
            if seed not in cache:
                out = self.path("special.npy")
                run("run", self.model[1], "--prompt-file", f, *self.SPECIAL_FLAGS, "--seed", seed,
                    "--tokens-out", out, "--force", check=0)
                cache[seed] = np.load(out)
            if wanted(cache[seed]):
                return f, seed, cache[seed]
        self.skipTest(f"no seed in 0..39 generates {what}")

    def test_batch_text_stays_one_line_per_prompt_when_a_newline_is_generated(self):
        """A continuation that holds a generated newline (the byte piece <0x0A>) must not
        add a line to the batch output: one line per prompt is how the output is read."""
        f, seed, ids = self._sampled_batch_with(lambda ids: (ids == NEWLINE_ID).any(), "a newline")
        p = run_bytes("run", self.model[1], "--prompt-file", f, *self.SPECIAL_FLAGS, "--seed", seed)
        self.assertEqual(p.returncode, 0, p.stderr)
        n, lines = len(self.SPECIAL_PROMPTS), p.stdout.count(b"\n")
        rows = sorted(set(np.argwhere(ids == NEWLINE_ID)[:, 0].tolist()))
        self.assertEqual(lines, n, f"seed {seed}: {n} prompts, {lines} lines; the generated ids of "
                                   f"rows {rows} hold {NEWLINE_ID} (<0x0A>)\n{p.stdout!r}")

    def test_batch_text_keeps_a_generated_nul_byte(self):
        """Each batch line must be the whole continuation, as that prompt run alone streams it,
        even past a generated NUL byte (the byte piece <0x00>)."""
        def checkable(ids, i):  # a NUL in row i, and no newline to shift the lines up to it
            return (ids[i] == NUL_ID).any() and not (ids[:i + 1] == NEWLINE_ID).any()

        f, seed, ids = self._sampled_batch_with(
            lambda ids: any(checkable(ids, i) for i in range(len(ids))), "a NUL byte")
        p = run_bytes("run", self.model[1], "--prompt-file", f, *self.SPECIAL_FLAGS, "--seed", seed)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.split(b"\n")
        for i, prompt in enumerate(self.SPECIAL_PROMPTS):
            if not checkable(ids, i):
                continue
            alone = run_bytes("run", self.model[1], "--prompt", prompt, *self.SPECIAL_FLAGS, "--seed", seed)
            self.assertEqual(alone.returncode, 0, alone.stderr)
            self.assertIn(b"\x00", alone.stdout)
            self.assertIn(b"\\x00", lines[i])
            self.assertEqual(lines[i] + b"\n", escape_line(alone.stdout[:-1]) + b"\n",
                             f"seed {seed}: prompt {i} ({prompt!r}) printed in the batch as "
                             f"{lines[i]!r}, alone as {alone.stdout!r}")

    def test_prompt_needs_a_tokenizer(self):
        self.assertFalse(os.path.exists(os.path.join(self.model_notok, "tokenizer.model")))
        p = run("run", self.model_notok, "--prompt", "Hello", "--max-tokens", 2, "--no-progress")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("no tokenizer", p.stderr)
        self.assertEqual(p.stdout, "")
        # Token ids in and out still work: the batch prints ids.
        p = run("run", self.model_notok, "--tokens-in", self.tokens_path, "--max-tokens", 2,
                "--temperature", 0, "--no-progress", check=0)
        self.assertEqual(len(p.stdout.splitlines()), 3)

    def test_bad_arguments_exit_2(self):
        m = self.model[1]
        cases = [[], ["--prompt", "a", "--prompt-file", self.path("prompts.txt")],
                 ["--prompt", "a", "--tokens-in", self.tokens_path],
                 ["--prompt", "a", "--top-p", 0], ["--prompt", "a", "--top-p", 1.5],
                 ["--prompt", "a", "--max-tokens", 0], ["--prompt", "a", "--temperature", -1],
                 ["--prompt", "a", "--bogus"]]
        for args in cases:
            with self.subTest(args=args):
                p = run("run", m, *args, "--no-progress")
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(p.stdout, "")
                self.assertRegex(p.stderr, r"(?i)usage|must|exactly one|does not exist")

    # 8. ------------------------------------------------------------------------------
    def test_logits_refuses_to_overwrite(self):
        out = self.path("exists.npy")
        with open(out, "wb") as fh:
            fh.write(b"precious")
        p = run("logits", self.model[1], "--tokens", self.tokens_path, "--out", out, "--no-progress")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertRegex(p.stderr, r"(?i)exists|overwrite")
        self.assertNotIn("of weights", p.stderr)  # refused before the weights load
        with open(out, "rb") as fh:
            self.assertEqual(fh.read(), b"precious")
        run("logits", self.model[1], "--tokens", self.tokens_path, "--out", out, "--force",
            "--no-progress", check=0)
        np.testing.assert_array_equal(np.load(out), np.load(self.logits[1]))

    def test_outputs_never_replace_inputs(self):
        # --force lets an output replace an earlier output, never a file the run reads:
        # the tokens, or a file of the model (through a symbolic link too).
        m = self.model[2]
        link = self.path("m2-link")
        if not os.path.exists(link):
            os.symlink(m, link)
        shard = os.path.join(m, "shard-00000-of-00002.gkt")
        model_before, tokens_before = files_of(m), np.load(self.tokens_path)
        cases = [("logits", "--tokens", self.tokens_path, "--out", self.tokens_path),
                 ("logits", "--tokens", self.tokens_path, "--out", shard),
                 ("logits", "--tokens", self.tokens_path, "--out", os.path.join(link, "manifest.json")),
                 ("run", "--tokens-in", self.tokens_path, "--tokens-out", self.tokens_path),
                 ("run", "--prompt", "a b", "--tokens-out", os.path.join(link, "tokenizer.model")),
                 ("run", "--prompt", "a b", "--tokenizer", self.tokenizer, "--tokens-out", self.tokenizer)]
        for cmd, *args in cases:
            with self.subTest(cmd=cmd, args=args):
                p = run(cmd, m, *args, "--force", "--no-progress")
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertRegex(p.stderr, r": is an input of this run( \(as .*\))?; choose another output")
                self.assertNotIn("of weights", p.stderr)  # refused before the weights load
        self.assertEqual(files_of(m), model_before)
        np.testing.assert_array_equal(np.load(self.tokens_path), tokens_before)

    def test_bad_prompts_refused_before_loading(self):
        """An empty prompt or an id outside the vocabulary fails from the config alone:
        with Grok-1 the load it would otherwise wait for takes minutes."""
        bad = self.path("bad_ids.npy")
        np.save(bad, np.array([[3, 4, 5], [6, 512, 7]], dtype=np.int32))  # vocab 512
        out = self.path("bad_out.npy")
        cases = [("run", "--prompt", "", "prompt 0 is empty"),
                 ("run", "--tokens-in", bad, "prompt 1, token 1: id 512 is outside the vocabulary [0, 512)"),
                 ("logits", "--tokens", bad, "prompt 1, token 1: id 512 is outside the vocabulary [0, 512)")]
        for cmd, flag, value, message in cases:
            with self.subTest(cmd=cmd, flag=flag):
                extra = ["--out", out] if cmd == "logits" else []
                p = run(cmd, self.model[2], flag, value, *extra, "--no-progress")
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertIn(message, p.stderr)
                self.assertNotIn("of weights", p.stderr)
                self.assertEqual(p.stdout, "")
                self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
