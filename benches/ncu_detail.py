"""Tables benches/ncu_detail.sh's Nsight Compute CSV: for each kernel, the metrics of its
first profiled launch (section, metric, value), one Markdown table per kernel.

    python3 benches/ncu_detail.py ncu-detail.csv
"""

import argparse
import csv
import re


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    a = ap.parse_args()
    with open(a.log, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    header = lines[0]
    # The logs of several runs, each with its header: keep the data rows.
    rows = csv.DictReader([header] + [line for line in lines if line != header])
    first = {}  # kernel -> (launch id, process id) of its first launch
    metrics = {}
    for r in rows:
        name = re.sub(r"[<(].*", "", r["Kernel Name"])[:60]
        launch = (r["ID"], r["Process ID"])
        first.setdefault(name, launch)
        if first[name] != launch:
            continue
        metrics.setdefault(name, []).append(
            (r["Section Name"], r["Metric Name"], r["Metric Unit"], r["Metric Value"],
             r["Block Size"], r["Grid Size"])
        )
    for name, ms in metrics.items():
        print(f"### `{name}` (block {ms[0][4]}, grid {ms[0][5]})\n")
        print("| section | metric | value |")
        print("|---|---|---|")
        for section, metric, unit, value, _, _ in ms:
            print(f"| {section} | {metric} | {value} {unit} |")
        print()


if __name__ == "__main__":
    main()
