#!/usr/bin/env bash
# Every GPU check and benchmark of mimco, in one go, on a machine with an NVIDIA GPU. It
# builds nothing: give it the folder holding `mimco` built with `--features cuda`,
# `shardtool` and the pipeline's `throughput` example (by default target/release and its
# examples/). Prints one table last.
#
#   cargo build --release --features cuda
#   cargo build --release -p shardtool -p pipeline --example throughput
#   benches/gpu.sh [BIN_DIR] [RESULTS_DIR]
#
# 1. `mimco bench kernels`: each fused kernel, forward and backward, against the composed
#    ops in f64 on random inputs (fails the script if one misses its tolerance).
# 2. `mimco bench train` on synthetic uint8 batches: ViT-S/16 MimCo at batch 256 in bf16
#    with the fused kernels, with Candle's stock ops only, and in tf32; ViT-B/16 at 128.
# 3. The same ViT-S/16 step fed by the pipeline from generated ImageNet-like shards, and
#    the loader alone on the node's cores (1, 8 and all decode threads).
# 4. The PyTorch baseline on the same card (benches/torch_mimco_step.py), where python3
#    has torch and timm.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
results=${2:-gpu-results}
mkdir -p "$results"
table="$results/table.md"
: > "$table"
status=0

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
echo "cores: $(nproc)"

echo "== 1. kernel checks"
if ! "$bin/mimco" bench kernels | tee "$results/kernels.md"; then
    echo "KERNEL CHECKS FAILED"
    status=1
fi

bench() { # label, then mimco bench train arguments
    local label=$1
    shift
    echo "== $label"
    if "$bin/mimco" bench train --device cuda "$@" 2> "$results/$label.err" | tee -a "$table"; then
        grep phases "$results/$label.err" || true
    else
        echo "FAILED: $label"
        tail -5 "$results/$label.err"
        status=1
    fi
}

echo "| config | device | precision | kernels | data | batch | images/s | step ms (median) | TFLOP/s | MFU | peak memory GiB | data wait |" >> "$table"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|" >> "$table"
s16=configs/vit_s16_mimco.toml
bench s16-bf16-fused --config "$s16" --batch 256 --precision bf16
bench s16-bf16-stock --config "$s16" --batch 256 --precision bf16 --kernels stock --steps 10 --warmup 2
bench s16-tf32-fused --config "$s16" --batch 256 --precision tf32 --steps 15
bench b16-bf16-fused --config configs/vit_b16_mimco.toml --batch 128 --precision bf16

echo "== 3. pipeline-fed: generating shards"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpubench.XXXXXX")
if "$bin/shardtool" synth "$work/imagenet" --classes 10 --per-class 1500 --val-per-class 0 \
    --no-bad-files --no-quirks --min-side 350 --max-side 500 > /dev/null &&
    "$bin/shardtool" pack "$work/imagenet" --out "$work/shards" -q --shard-size 64MB > /dev/null; then
    bench s16-bf16-fused-shards --config "$s16" --batch 256 --precision bf16 --data "$work/shards/train"
    throughput=$bin/throughput
    [ -x "$throughput" ] || throughput=$bin/examples/throughput
    if [ -x "$throughput" ]; then
        for workers in 1 8 "$(nproc)"; do
            "$throughput" "$work/shards/train" --workers "$workers" --epochs 3 2>&1 | grep '^loader' |
                tee -a "$results/loader.md"
        done
    else
        echo "no throughput binary in $bin: loader scaling skipped"
    fi
else
    echo "FAILED: generating shards"
    status=1
fi
rm -rf "$work"

echo "== 4. PyTorch on the same card"
if python3 -c 'import torch, timm' 2> /dev/null; then
    for args in "--dim 384 --heads 6 --teacher-heads 12 --batch 256" \
        "--dim 768 --heads 12 --teacher-heads 12 --batch 128"; do
        # shellcheck disable=SC2086
        python3 benches/torch_mimco_step.py $args 2>&1 | tail -1 | tee -a "$results/torch.md"
    done
else
    echo "no torch/timm here: skipped"
fi

echo
echo "== results ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
cat "$table"
[ -f "$results/torch.md" ] && cat "$results/torch.md"
[ -f "$results/loader.md" ] && cat "$results/loader.md"
grep -E "kernel checks:" "$results/kernels.md" || true
exit $status
