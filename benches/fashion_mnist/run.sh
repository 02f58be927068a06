#!/usr/bin/env bash
# The paper's claims in miniature on real labelled images (Fashion-MNIST, Debian's
# dataset-fashion-mnist): seven encoders, each evaluated by k-NN and a linear probe on the
# test split, one table at the end.
#   1 random init   2 MoCo v3 teacher   3 SimMIM   4 MimCo (teacher = 2)
#   5 MimCo patch loss only   6 MimCo image loss only   7 MimCo without masking
# Runs 2-7 train for the same number of epochs on the same images.
#
#   bash benches/fashion_mnist/run.sh            # full: 6,000 train / 10,000 test images, 6 epochs
#   bash benches/fashion_mnist/run.sh --small    # CI: 300 / 100 images, 1 epoch (checks commands, not accuracy)
#
# Environment: N_TRAIN, N_VAL, EPOCHS override the sizes; WORK the output folder (default
# target/fashion-mnist[-small]); BIN the folder with mimco and shardtool (default: builds
# target/release).
set -euo pipefail
cd "$(dirname "$0")/../.."
small=0
[ "${1:-}" = "--small" ] && small=1
if [ $small = 1 ]; then
    : "${N_TRAIN:=300}" "${N_VAL:=100}" "${EPOCHS:=1}" "${WORK:=target/fashion-mnist-small}"
else
    : "${N_TRAIN:=6000}" "${N_VAL:=10000}" "${EPOCHS:=6}" "${WORK:=target/fashion-mnist}"
fi
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked -q
    BIN=target/release
fi
[ -d /usr/share/datasets/fashion-mnist ] || {
    echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist" >&2
    exit 1
}
rm -rf "$WORK"
mkdir -p "$WORK/configs"
started=$(date +%s)
python3 benches/fashion_mnist/to_folder.py "$WORK/images" --train "$N_TRAIN" --val "$N_VAL"
"$BIN/shardtool" pack "$WORK/images" --out "$WORK/shards" --shard-size 256KB --quiet

# Configs: the three in configs/, with this run's epochs; ablations change one line each.
variant() { # name source sed-expression
    sed -e "s/^epochs = .*/epochs = $EPOCHS/" -e "$3" "configs/$2" > "$WORK/configs/$1.toml"
}
variant mocov3 fmnist_mocov3.toml ''
variant simmim fmnist_simmim.toml ''
variant mimco fmnist_mimco.toml ''
variant mimco-patch fmnist_mimco.toml 's/^image_loss = true/image_loss = false/'
variant mimco-image fmnist_mimco.toml 's/^patch_loss = "contrastive"/patch_loss = "none"/'
variant mimco-nomask fmnist_mimco.toml 's/^masking = true/masking = false/'

train() { # name [teacher flags]
    local name=$1
    shift
    echo "== train $name"
    "$BIN/mimco" train --config "$WORK/configs/$name.toml" --data "$WORK/shards/train" \
        --out "$WORK/runs/$name" --quiet "$@"
}
train mocov3
train simmim
for v in mimco mimco-patch mimco-image mimco-nomask; do
    train $v --teacher "$WORK/runs/mocov3/last.safetensors"
done

evaluate() { # label [weights flags]
    local label=$1
    shift
    for kind in knn linear; do
        "$BIN/mimco" eval $kind --train "$WORK/shards/train" --val "$WORK/shards/val" \
            --feature mean --label "$label" --results "$WORK/results.jsonl" "$@"
    done
}
evaluate "1 random init" --config "$WORK/configs/mimco.toml"
evaluate "2 MoCo v3 teacher" --weights "$WORK/runs/mocov3/last.safetensors"
evaluate "3 SimMIM" --weights "$WORK/runs/simmim/last.safetensors"
evaluate "4 MimCo" --weights "$WORK/runs/mimco/last.safetensors"
evaluate "5 MimCo, patch loss only" --weights "$WORK/runs/mimco-patch/last.safetensors"
evaluate "6 MimCo, image loss only" --weights "$WORK/runs/mimco-image/last.safetensors"
evaluate "7 MimCo, no masking" --weights "$WORK/runs/mimco-nomask/last.safetensors"

python3 benches/fashion_mnist/table.py "$WORK/results.jsonl" 14
echo "$N_TRAIN train / $N_VAL test images, $EPOCHS epochs, $(( $(date +%s) - started )) s on $(nproc) cores"
