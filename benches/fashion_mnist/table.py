"""Prints the Fashion-MNIST results (a mimco eval results file) as a Markdown table and
checks that it holds the expected number of lines.

    python3 table.py results.jsonl [expected-lines]
"""
import json
import sys

rows, order = {}, []
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if len(sys.argv) > 2 and len(lines) != int(sys.argv[2]):
    raise SystemExit(f"{sys.argv[1]}: {len(lines)} results, expected {sys.argv[2]}")
for r in lines:
    for key in ("eval", "label", "top1", "top5", "feature", "train_samples", "val_samples"):
        if key not in r:
            raise SystemExit(f"result without {key}: {r}")
    if r["label"] not in rows:
        order.append(r["label"])
        rows[r["label"]] = {}
    rows[r["label"]][r["eval"]] = r["top1"]
print("| encoder | k-NN top-1 (%) | linear probe top-1 (%) |")
print("| --- | --- | --- |")
for label in order:
    cell = lambda k: f"{rows[label][k]:.2f}" if k in rows[label] else "-"
    print(f"| {label} | {cell('knn')} | {cell('linear')} |")
