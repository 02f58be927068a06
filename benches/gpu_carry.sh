#!/usr/bin/env bash
# Builds what benches/gpu.sh runs into .carry/ (git ignores it), for a GPU machine that has
# no Rust toolchain and no network: mimco with `--features cuda`, shardtool and the
# pipeline's throughput example, stripped and gzipped, and nvJPEG's library from PyPI
# (nvidia-nvjpeg 13.0, for `[data] device_decode`), gzipped. Without nvcc on PATH it takes
# the CUDA 13.0 toolchain from PyPI wheels (../shared/gpu/cuda-toolchain.sh, or the
# script CUDA_TOOLCHAIN names). ~15 min cold on 2 cores, a few minutes after a change.
#
# On the GPU machine, in the copy of the repository that .carry/ travelled with:
#   mkdir -p /tmp/bin && for f in .carry/*.gz; do gunzip -c "$f" > "/tmp/bin/$(basename "$f" .gz)"; done
#   chmod +x /tmp/bin/* && export LD_LIBRARY_PATH=/tmp/bin:$TORCH_CUDA_LIBS:$LD_LIBRARY_PATH
#   bash benches/gpu.sh /tmp/bin "$OUT"
# (TORCH_CUDA_LIBS: the cu13/lib folder of PyTorch's nvidia wheels, ../shared/gpu/README.md.)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    # shellcheck disable=SC1090 # the toolchain script prints the exports
    source <(bash "${CUDA_TOOLCHAIN:-../shared/gpu/cuda-toolchain.sh}")
fi
target=target-cuda
cargo build --release --features cuda --target-dir "$target" --bin mimco
cargo build --release -p shardtool --bin shardtool --target-dir "$target"
cargo build --release -p pipeline --example throughput --target-dir "$target"
mkdir -p .carry
for f in "$target/release/mimco" "$target/release/shardtool" "$target/release/examples/throughput"; do
    strip -o ".carry/$(basename "$f")" "$f"
    gzip -f ".carry/$(basename "$f")"
done
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
pip download --quiet --no-deps --dest "$wheels" "nvidia-nvjpeg==13.0.*"
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("nvidia/cu13/lib/libnvjpeg.so.13", sys.argv[2])' \
    "$(ls "$wheels"/nvidia_nvjpeg-*.whl)" "$wheels"
gzip -c "$wheels/nvidia/cu13/lib/libnvjpeg.so.13" > .carry/libnvjpeg.so.13.gz
ls -l .carry
du -sh .carry
