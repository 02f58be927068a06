#!/usr/bin/env bash
# Decode-only JPEG rates, one thread, full-size RGB: libjpeg-turbo 3 (the `turbojpeg` crate,
# which the pipeline uses), zune-jpeg and jpeg-decoder, on the same files in memory,
# alternating rounds. Not a test: it prints the figures to read.
#
#   benches/jpeg_decoders.sh [JPEG_FOLDER] [ROUNDS]
#
# Without a folder it generates 2,000 ImageNet-like JPEGs as benches/data.sh does. Builds
# benches/jpeg_decoders (a separate Cargo project) into target/jpeg-decoders; needs cmake
# and nasm, like the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${2:-3}
cargo build --release --quiet --manifest-path benches/jpeg_decoders/Cargo.toml \
    --target-dir target/jpeg-decoders
dir=${1:-}
if [ -z "$dir" ]; then
    cargo build --release --locked --quiet -p shardtool
    work=$(mktemp -d "${TMPDIR:-/tmp}/jpegbench.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    target/release/shardtool synth "$work/imagenet" --classes 10 --per-class 200 --val-per-class 0 \
        --no-bad-files --no-quirks --min-side 350 --max-side 450 --min-quality 98 --max-quality 100 > /dev/null
    dir=$work/imagenet
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
target/jpeg-decoders/release/jpeg-decoders-bench "$dir" "$rounds"
