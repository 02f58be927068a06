"""Summarises an Nsight Compute CSV log of one training step (benches/gpu.sh's `ncu` step):
GPU time per kernel name, largest first, and the total, as a Markdown table.

    python3 benches/ncu_summary.py ncu.csv [--top 40]

The log holds one row per kernel launch with the metric `gpu__time_duration.sum` (ns),
measured with the kernels serialised, so the total is the step's GPU busy time without
overlap; compare it with the step's wall time to see how much of the step the host adds.
"""

import argparse
import collections
import csv
import re


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    with open(a.log, newline="") as f:
        rows = [line for line in f if line.startswith('"')]
    total = collections.Counter()
    count = collections.Counter()
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        ns *= {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}.get(unit, 1)
        # Template arguments make every instance a name of its own: keep the kernel.
        name = re.sub(r"<.*", "", r["Kernel Name"])[:80]
        total[name] += ns
        count[name] += 1
    launches, busy = sum(count.values()), sum(total.values())
    print(f"kernels in the profiled step: {launches} launches, {busy / 1e6:.1f} ms of GPU time")
    print("| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    for name, ns in total.most_common(a.top):
        print(f"| `{name}` | {count[name]} | {ns / 1e6:.2f} | {100 * ns / max(busy, 1):.1f}% |")
    rest = busy - sum(ns for _, ns in total.most_common(a.top))
    if rest > 0:
        print(f"| (the other {len(total) - a.top} kernels) | | {rest / 1e6:.2f} | {100 * rest / busy:.1f}% |")


if __name__ == "__main__":
    main()
