#!/usr/bin/env bash
# Data loading: the pipeline (local shards and S3) next to the torchvision-style Python
# pipeline, on the same generated ImageNet-like files and the same cores. Not a test:
# it prints the figures to read.
#
#   benches/data.sh [CLASSES] [IMAGES_PER_CLASS]
#
# Images: crops of the embedded photos, shorter side 350-450 px (~0.2 MP), 4:2:0 like
# ImageNet's, JPEG quality 98-100: the crops of a few photos are smoother than ImageNet's
# photos, and this quality brings them to ImageNet's ~110 KB per image. The S3 run
# starts SeaweedFS from target/test-venv (tests/run.sh installs it) on 127.0.0.1 and
# stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
classes=${1:-10}
per_class=${2:-200}
# Two builds: with --example, cargo builds only the example, not shardtool's binary.
cargo build --release --locked -p shardtool --bin shardtool >&2
cargo build --release --locked -p pipeline --example throughput >&2
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/databench.XXXXXX")
weed_pid=""
cleanup() {
    if [ -n "$weed_pid" ]; then
        kill "$weed_pid" 2> /dev/null || true
        sleep 2
        kill -9 "$weed_pid" 2> /dev/null || true # weed mini may ignore SIGTERM
    fi
    rm -rf "$work"
}
trap cleanup EXIT

venv=target/bench-venv
if ! "$venv/bin/python" -c 'import PIL, numpy' 2> /dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet pillow numpy >&2
fi

"$bin/shardtool" synth "$work/imagenet" --classes "$classes" --per-class "$per_class" --val-per-class 0 \
    --no-bad-files --no-quirks --min-side 350 --max-side 450 --min-quality 98 --max-quality 100
"$bin/shardtool" pack "$work/imagenet" --out "$work/shards" -q --shard-size 16MB | head -1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "== pipeline, local shards"
"$bin/examples/throughput" "$work/shards/train" --workers 1
"$bin/examples/throughput" "$work/shards/train" --workers "$(nproc)" --decoders
echo
echo "== pipeline, local shards, JPEGs left for the GPU ([data] device_decode: the CPU's share)"
"$bin/examples/throughput" "$work/shards/train" --workers "$(nproc)" --device-decode --epochs 3
echo
echo "== torchvision-style Python (Pillow + NumPy, multiprocessing)"
"$venv/bin/python" benches/torchvision_style.py "$work/imagenet" --decode-only
"$venv/bin/python" benches/torchvision_style.py "$work/imagenet" --workers 1
"$venv/bin/python" benches/torchvision_style.py "$work/imagenet" --workers "$(nproc)"

weed=target/test-venv/bin/weed
if [ -x "$weed" ]; then
    echo
    echo "== pipeline, S3 (SeaweedFS on 127.0.0.1)"
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_ENDPOINT_URL=http://127.0.0.1:18334
    "$weed" mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -webdav=false \
        -admin.ui=false -s3.port.iceberg=0 -s3.port=18334 -bucket=bench > "$work/weed.log" 2>&1 &
    weed_pid=$!
    for _ in $(seq 60); do (echo > /dev/tcp/127.0.0.1/18334) 2> /dev/null && break; sleep 1; done
    sleep 2
    "$bin/examples/throughput" s3://bench/imagenet/train --workers "$(nproc)" --upload-from "$work/shards/train"
else
    echo "(no SeaweedFS in target/test-venv: run tests/run.sh first for the S3 figures)"
fi
