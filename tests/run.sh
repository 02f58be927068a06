#!/usr/bin/env bash
# The project's test command (see README): formatting, lints, docs and every test, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f target/tmp/SKIPPED-*.txt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --workspace --locked --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# Tests that had to skip say so here, not only in captured output.
for f in target/tmp/SKIPPED-*.txt; do
    if [ -e "$f" ]; then cat "$f"; fi
done
# One closing line over every test binary and doc-test run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
