#!/usr/bin/env bash
# What limits the largest kernels of a ViT-S/16 step (batch 256, bf16): Nsight Compute's
# speed-of-light, occupancy, launch and warp-state sections for two launches of each, from
# the profiled step of `mimco bench train` (its last, between the profiler marks). One
# process per kernel, so each is profiled from the same point of the step. Needs ncu;
# builds nothing; each kernel has 60 s (the first run also compiles the kernels). The CSV
# logs go to RESULTS (gzipped, one file); `ncu_detail.py` tables them.
#
#   benches/ncu_detail.sh BIN_DIR RESULTS
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
results=${2:-gpu-results}
mkdir -p "$results"
out=$results/ncu-detail.csv
: > "$out"
for kernel in flash_bwd_dkv flash_bwd_dq flash_fwd_bf16_64 flash_fwd_bf16_32 bias_act_fwd \
    bias_act_bwd layer_norm_fwd layer_norm_bwd badd_f32; do
    echo "== $kernel (t=${SECONDS}s)"
    log=$results/ncu-$kernel.csv
    timeout 60 ncu --profile-from-start off -k "regex:^$kernel" --launch-count 2 --csv \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        --cache-control none --clock-control none --log-file "$log" \
        "$bin/mimco" bench train --device cuda --config configs/vit_s16_mimco.toml \
        --batch 256 --precision bf16 --steps 2 --warmup 2 > /dev/null 2>&1 ||
        echo "FAILED: $kernel"
    grep '^"' "$log" >> "$out" 2> /dev/null
    rm -f "$log"
done
python3 benches/ncu_detail.py "$out" | tee "$results/ncu-detail.md"
gzip -f "$out"
