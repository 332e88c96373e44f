#!/usr/bin/env python3
"""The kernels of an Nsight Compute per-kernel summary, ranked by total time.

Reads the output of `ncu --metrics gpu__time_duration.sum --print-summary per-kernel ...`
(scripts/gpu-check.sh keeps it as profile.txt) and prints one line per kernel and launch
shape: total time, share of the whole, launches, average, and the kernel with its grid
and block. Kernels run one at a time under ncu, so the totals are each kernel's own time.

  ncu_summary.py PROFILE.txt [--top N]

A file holding several profiler runs may mark each with a line `### section: NAME`
(gpu-check.sh profiles the decode steps and the prefill apart); each section is then
ranked on its own, under its name.
"""
import argparse
import re
import sys

HEAD = re.compile(r"^  (?P<name>\S.*?) \((?P<grid>\d+, \d+, \d+)\)x\((?P<block>\d+, \d+, \d+)\), .*Invocations (?P<n>\d+)\s*$")
TIME = re.compile(r"^\s+gpu__time_duration\.sum\s+(?P<unit>[a-z]+)\s+(?P<min>[\d.,]+)\s+(?P<max>[\d.,]+)\s+(?P<avg>[\d.,]+)")
# Optional: DRAM throughput as a share of its peak (the column "dram %"; blank without it).
DRAM = re.compile(r"^\s+dram__throughput\.avg\.pct_of_peak_sustained_elapsed\s+%\s+(?P<min>[\d.,]+)\s+(?P<max>[\d.,]+)\s+(?P<avg>[\d.,]+)")
UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def parse(lines):
    """[(total_us, launches, avg_us, name, grid, block, dram_pct or None)] in file order."""
    out, head, time, dram = [], None, None, None

    def flush():
        if head is not None and time is not None:
            n = int(head["n"])
            out.append((time * n, n, time, head["name"], head["grid"], head["block"], dram))

    for line in lines:
        m = HEAD.match(line)
        if m:
            flush()
            head, time, dram = m, None, None
            continue
        t = TIME.match(line)
        if t and head is not None:
            if t["unit"] not in UNIT_US:
                raise ValueError(f"unknown time unit '{t['unit']}' in: {line.strip()}")
            time = float(t["avg"].replace(",", "")) * UNIT_US[t["unit"]]
            continue
        d = DRAM.match(line)
        if d and head is not None:
            dram = float(d["avg"].replace(",", ""))
    flush()
    return out


SECTION = re.compile(r"^### section: (?P<name>.+?)\s*$")


def sections(lines):
    """[(name, lines)]: the parts after each `### section:` line (name None before any)."""
    out = [(None, [])]
    for line in lines:
        m = SECTION.match(line)
        if m:
            out.append((m["name"], []))
        else:
            out[-1][1].append(line)
    return [(name, part) for name, part in out if name is not None or any(l.strip() for l in part)]


def table(rows, top):
    whole = sum(r[0] for r in rows)
    print(f"{'total us':>10} {'share':>6} {'launches':>8} {'avg us':>9} {'dram %':>6}  kernel (grid)x(block)")
    for total, n, avg, name, grid, block, dram in rows[:top or None]:
        pct = f"{dram:6.1f}" if dram is not None else f"{'':6}"
        print(f"{total:10.1f} {total / whole:6.1%} {n:8d} {avg:9.2f} {pct}  {short(name)} ({grid})x({block})")
    print(f"{whole:10.1f} {1:6.0%} {sum(r[1] for r in rows):8d} {'':16}  all {len(rows)} kernels and shapes")


def short(name):
    """The kernel's name without its parameter list and namespaces' noise."""
    name = re.sub(r"\(.*\)$", "", name.replace("(anonymous namespace)", "").replace("<unnamed>", ""))
    name = re.sub(r"\b(grokit|kernels|cuda)::", "", name).replace("::::", "::")
    return re.sub(r"^(void )?(::)?", "", name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=0, help="only the N largest (0: all)")
    args = ap.parse_args(argv)
    with open(args.profile, errors="replace") as f:
        parts = [(name, sorted(parse(part), key=lambda r: -r[0])) for name, part in sections(f.read().splitlines())]
    parts = [(name, rows) for name, rows in parts if rows]
    if not parts:
        print(f"ncu_summary.py: no kernel summaries in {args.profile}", file=sys.stderr)
        return 1
    for i, (name, rows) in enumerate(parts):
        if name is not None:
            print(("\n" if i else "") + f"{name}:")
        table(rows, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
