#!/usr/bin/env bash
# The project's test command (see README): formatting, lints, docs and every test, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f target/tmp/SKIPPED-*.txt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --workspace --locked --quiet
cargo test --workspace --locked
# Tests that had to skip say so here, not only in captured output.
for f in target/tmp/SKIPPED-*.txt; do
    if [ -e "$f" ]; then cat "$f"; fi
done
