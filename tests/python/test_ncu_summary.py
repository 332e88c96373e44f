"""scripts/ncu_summary.py: an Nsight Compute per-kernel summary ranked by total time."""
import contextlib
import io
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
import ncu_summary  # noqa: E402

# The shape of `ncu --metrics gpu__time_duration.sum --print-summary per-kernel` output.
SAMPLE = """==PROF== Connected to process 844 (/x/grokit)
grokit bench-device: cuda device 0: NVIDIA H200
==PROF== Disconnected from process 844
[844] grokit@127.0.0.1
  <unnamed>::read_kernel(const float4 *, unsigned long, float, float *) (1056, 1, 1)x(512, 1, 1), Device 0, CC 9.0, Invocations 6
    Section: Command line profiler metrics
    ---------------------- ----------- ------- ------- -------
    Metric Name            Metric Unit Minimum Maximum Average
    ---------------------- ----------- ------- ------- -------
    gpu__time_duration.sum          us  952.26  958.24  954.18
    ---------------------- ----------- ------- ------- -------

  void mm::decode_kernel<0, 1>(mm::DecodeParams) (16, 12, 8)x(256, 1, 1), Device 0, CC 9.0, Invocations 48
    Section: Command line profiler metrics
    gpu__time_duration.sum          us   25.98   28.10   27.20
    dram__throughput.avg.pct_of_peak_sustained_elapsed            %   39.10   41.30   40.25

  grokit::router_kernel(const float *, long, long, const float *, int, int, int *, float *) (1, 1, 1)x(1024, 1, 1), Device 0, CC 9.0, Invocations 2
    Section: Command line profiler metrics
    gpu__time_duration.sum          ms    1.50    2.50    2.00
"""


class NcuSummary(unittest.TestCase):
    def run_on(self, text, *args):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = ncu_summary.main([f.name, *args])
            return rc, out.getvalue(), err.getvalue()
        finally:
            os.unlink(f.name)

    def test_ranks_by_total_time_with_units(self):
        rows = ncu_summary.parse(SAMPLE.splitlines())
        self.assertEqual([r[1] for r in rows], [6, 48, 2])
        self.assertAlmostEqual(rows[0][0], 6 * 954.18)
        self.assertAlmostEqual(rows[2][2], 2000.0)  # ms -> us
        rc, out, _ = self.run_on(SAMPLE)
        self.assertEqual(rc, 0)
        lines = out.splitlines()
        self.assertIn("read_kernel (1056, 1, 1)x(512, 1, 1)", lines[1])  # 5725 us first
        self.assertIn("router_kernel (1, 1, 1)x(1024, 1, 1)", lines[2])  # 4000 us
        self.assertIn("mm::decode_kernel<0, 1> (16, 12, 8)", lines[3])   # 1306 us
        self.assertIn("all 3 kernels", lines[-1])
        self.assertEqual([r[6] for r in rows], [None, 40.25, None])  # dram %, where measured
        self.assertIn("  40.2  mm::decode_kernel", lines[3])

    def test_top_limits_the_rows(self):
        rc, out, _ = self.run_on(SAMPLE, "--top", "1")
        self.assertEqual(rc, 0)
        self.assertEqual(len(out.splitlines()), 3)  # header, one kernel, the total

    def test_no_summary_is_an_error(self):
        rc, out, err = self.run_on("==PROF== nothing profiled\n")
        self.assertEqual(rc, 1)
        self.assertIn("no kernel summaries", err)

    def test_sections_are_ranked_apart(self):
        text = "### section: decode\n" + SAMPLE + "### section: prefill\n" + SAMPLE.replace("Invocations 2", "Invocations 9")
        rc, out, _ = self.run_on(text, "--top", "1")
        self.assertEqual(rc, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0], "decode:")
        self.assertIn("read_kernel", lines[2])
        self.assertIn("all 3 kernels", lines[3])
        self.assertEqual(lines[5], "prefill:")
        self.assertIn("router_kernel", lines[7])  # 9 x 2000 us now leads
        self.assertEqual(len(lines), 9)

    def test_an_unknown_unit_is_refused(self):
        bad = SAMPLE.replace("ms    1.50", "fortnights    1.50")
        with self.assertRaises(ValueError):
            ncu_summary.parse(bad.splitlines())


if __name__ == "__main__":
    unittest.main()
