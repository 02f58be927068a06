#!/usr/bin/env bash
# Every GPU check and benchmark of mimco, in one go, on a machine with an NVIDIA GPU. It
# builds nothing: give it the folder holding `mimco` built with `--features cuda`,
# `shardtool` and the pipeline's `throughput` example (by default target/release and its
# examples/). Each step prints its start time (t=SECONDS since the start); one table last.
#
#   cargo build --release --features cuda
#   cargo build --release -p shardtool --bin shardtool
#   cargo build --release -p pipeline --example throughput
#   benches/gpu.sh [BIN_DIR] [RESULTS_DIR]
#
# Steps, most important first (each has a time limit, so one hang cannot use up a lent
# machine's minutes; ONLY=REGEX runs just the steps whose label matches):
#   kernels          `mimco bench kernels`: each fused kernel, forward and backward, against
#                    the composed ops in f64 on random inputs (fails if one misses).
#   s16-bf16-fused   `mimco bench train`, synthetic uint8 batches, ViT-S/16 MimCo, batch 256.
#   ncu-s16          GPU time per kernel of one such step (Nsight Compute).
#   torch-s16        the PyTorch baseline of the same step on the same card
#                    (benches/torch_mimco_step.py; needs python3 with torch and timm).
#   b16-bf16-fused, torch-b16   the same for ViT-B/16 at batch 128.
#   s16-bf16-stock   Candle's stock ops only; s16-tf32-fused: f32 weights, TF32 matmuls.
#   s16-bf16-without-flash, -blocks-node, -stem, -residual, -epilogue, -copy-stream   the
#                    step with one fast path off (`--without`): what each buys, or the step
#                    without a broken one.
#   s16-bf16-fused-shards, loader-N   the step fed by the pipeline from generated
#                    ImageNet-like shards; the loader alone on 1, 8 and all cores.
#   s16-bf16-device-decode-shards, loader-N-device-decode   the same with the JPEGs left
#                    encoded for the GPU (`[data] device_decode`: nvJPEG's hardware decoder;
#                    needs libnvjpeg.so.13 on LD_LIBRARY_PATH, e.g. from PyPI's
#                    nvidia-nvjpeg 13.0); the loader's share of the work on all cores.
#   feed, feed-device-decode   `mimco bench feed`: those shards' batches uploaded to the
#                    GPU (and decoded there) with no step, on all cores: the rate the data
#                    path fills a GPU at.
#   train-s16        `mimco train` on those shards: 6 steps, checkpoints, --resume to 12.
#   torch-s16-compile   the PyTorch baseline under torch.compile.
set -uo pipefail # a timeout's failure, not tee's success, decides a step's status
# Results: table.md, torch.md, loader.md, kernels.md, ncu-s16.{md,csv.gz}, and every
# step's own output in steps.log (few files: the lent machines return a limited number).
cd "$(dirname "$0")/.."
bin=${1:-target/release}
results=${2:-gpu-results}
only=${ONLY:-.}
mkdir -p "$results"
table="$results/table.md"
status=0
s16=configs/vit_s16_mimco.toml
b16=configs/vit_b16_mimco.toml
torch_s16="--dim 384 --heads 6 --teacher-heads 12 --batch 256"
torch_b16="--dim 768 --heads 12 --teacher-heads 12 --batch 128"

wanted() { echo "$1" | grep -qE "$only"; }

fail() {
    echo "FAILED: $1"
    status=1
}

bench() { # label, then mimco bench train arguments
    local label=$1
    shift
    wanted "$label" || return 0
    echo "== $label (t=${SECONDS}s)"
    local err=$results/step.err
    if timeout 150 "$bin/mimco" bench train --device cuda "$@" 2> "$err" | tee -a "$table"; then
        grep -E "phases|device decode" "$err" || true
    else
        fail "$label"
        tail -5 "$err"
    fi
    { echo "== $label"; cat "$err"; } >> "$results/steps.log"
    rm -f "$err"
}

torch_step() { # label, limit in seconds, then torch_mimco_step.py arguments
    local label=$1 limit=$2
    shift 2
    wanted "$label" || return 0
    echo "== $label (t=${SECONDS}s)"
    if ! python3 -c 'import torch, timm' 2> /dev/null; then
        echo "no torch/timm here: skipped"
        return 0
    fi
    echo "== $label" >> "$results/steps.log"
    timeout "$limit" python3 benches/torch_mimco_step.py "$@" > "$results/torch.out" 2>&1 || fail "$label"
    cat "$results/torch.out" >> "$results/steps.log"
    tail -1 "$results/torch.out" | tee -a "$results/torch.md"
    rm -f "$results/torch.out"
}

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
echo "| config | device | precision | kernels | data | batch | images/s | step ms (median) | TFLOP/s | MFU | peak memory GiB | data wait |" > "$table"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|" >> "$table"

if wanted kernels; then
    echo "== kernels (t=${SECONDS}s)"
    timeout 180 "$bin/mimco" bench kernels 2>&1 | tee "$results/kernels.md" || fail kernels
fi
bench s16-bf16-fused --config "$s16" --batch 256 --precision bf16
if wanted ncu-s16; then
    # GPU time per kernel of one ViT-S/16 step (the bench's last, between its profiler
    # marks), kernels serialised, clocks left alone; needs Nsight Compute.
    echo "== ncu-s16 (t=${SECONDS}s)"
    if command -v ncu > /dev/null; then
        timeout 240 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
            --print-units base --cache-control none --clock-control none \
            --log-file "$results/ncu-s16.csv" "$bin/mimco" bench train --device cuda \
            --config "$s16" --batch 256 --precision bf16 --steps 3 --warmup 2 \
            > /dev/null 2>> "$results/steps.log" || fail ncu-s16
        python3 benches/ncu_summary.py "$results/ncu-s16.csv" | tee "$results/ncu-s16.md"
        gzip -f "$results/ncu-s16.csv"
    else
        echo "no ncu here: skipped"
    fi
fi
# shellcheck disable=SC2086 # the argument strings are split on purpose
torch_step torch-s16 150 $torch_s16
bench b16-bf16-fused --config "$b16" --batch 128 --precision bf16
torch_step torch-b16 150 $torch_b16
bench s16-bf16-stock --config "$s16" --batch 256 --precision bf16 --kernels stock --steps 10 --warmup 2
bench s16-tf32-fused --config "$s16" --batch 256 --precision tf32 --steps 15 --peak-tflops 494.5
for path in flash blocks-node stem residual epilogue copy-stream; do
    bench "s16-bf16-without-$path" --config "$s16" --batch 256 --precision bf16 --without "$path" \
        --steps 15 --warmup 3
done

if wanted s16-bf16-fused-shards || wanted train-s16 || wanted loader-1 || wanted loader-8 ||
    wanted "loader-$(nproc)" || wanted s16-bf16-device-decode-shards || wanted feed; then
    echo "== generating shards (t=${SECONDS}s)"
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpubench.XXXXXX")
    if timeout 120 "$bin/shardtool" synth "$work/imagenet" --classes 10 --per-class 1500 --val-per-class 0 \
        --no-bad-files --no-quirks --min-side 350 --max-side 450 --min-quality 98 --max-quality 100 > /dev/null &&
        timeout 60 "$bin/shardtool" pack "$work/imagenet" --out "$work/shards" -q --shard-size 64MB > /dev/null; then
        bench s16-bf16-fused-shards --config "$s16" --batch 256 --precision bf16 --data "$work/shards/train"
        sed '/^\[data\]$/a device_decode = true' "$s16" > "$work/s16_device_decode.toml"
        bench s16-bf16-device-decode-shards --config "$work/s16_device_decode.toml" --batch 256 \
            --precision bf16 --data "$work/shards/train"
        for feed in feed feed-device-decode; do
            wanted "$feed" || continue
            echo "== $feed (t=${SECONDS}s)"
            cfg=$s16
            [ "$feed" = feed-device-decode ] && cfg=$work/s16_device_decode.toml
            timeout 120 "$bin/mimco" bench feed --device cuda --config "$cfg" \
                --data "$work/shards/train" --batches 150 2>> "$results/steps.log" |
                tee -a "$results/loader.md" || fail "$feed"
        done
        if wanted train-s16; then
            # The real training command on those shards: 6 optimiser steps of 2,048 images
            # (8 micro-batches each), a checkpoint every 3, then --resume to step 12 (across
            # the first epoch's end).
            echo "== train-s16 (t=${SECONDS}s)"
            cfg=$work/s16_train.toml
            sed -e 's/^max_steps = 0$/max_steps = 6/' -e 's/^checkpoint_every = 1000$/checkpoint_every = 3/' \
                -e 's/^log_every = 10$/log_every = 1/' "$s16" > "$cfg"
            run() { # resume or not
                echo "== train-s16 $*" >> "$results/steps.log"
                timeout 150 "$bin/mimco" train --config "$cfg" --data "$work/shards/train" \
                    --random-teacher --out "$work/run" --quiet --device cuda "$@" >> "$results/steps.log" 2>&1
            }
            if run && sed -i 's/^max_steps = 6$/max_steps = 12/' "$cfg" && run --resume &&
                tail -1 "$work/run/metrics.jsonl" | grep -q '"step":12'; then
                tail -1 "$work/run/metrics.jsonl" | tee -a "$results/steps.log"
            else
                fail train-s16
                tail -5 "$results/steps.log"
            fi
        fi
        throughput=$bin/throughput
        [ -x "$throughput" ] || throughput=$bin/examples/throughput
        for workers in 1 8 "$(nproc)"; do
            wanted "loader-$workers" || continue
            epochs=3
            [ "$workers" = 1 ] && epochs=1
            timeout 120 "$throughput" "$work/shards/train" --workers "$workers" --epochs $epochs 2>&1 |
                grep '^loader' | tee -a "$results/loader.md" || fail "loader-$workers"
        done
        if wanted "loader-$(nproc)-device-decode"; then
            timeout 120 "$throughput" "$work/shards/train" --workers "$(nproc)" --epochs 3 --device-decode 2>&1 |
                grep -E '^(loader|stages)' | tee -a "$results/loader.md" || fail "loader-$(nproc)-device-decode"
        fi
    else
        fail "generating shards"
    fi
    rm -rf "$work"
fi
torch_step torch-s16-compile 240 $torch_s16 --compile

echo
echo "== results at t=${SECONDS}s ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
cat "$table"
[ -f "$results/torch.md" ] && cat "$results/torch.md"
[ -f "$results/loader.md" ] && cat "$results/loader.md"
grep -E "kernel checks:" "$results/kernels.md" 2> /dev/null || true
exit $status
