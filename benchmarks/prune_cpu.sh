#!/usr/bin/env bash
# The pruning benchmarks of benchmarks/RESULTS.md (issue 5): every pruning defense on one backdoored model.
#   cifar ATTACK: the undefended small-CNN model of benchmarks/cifar_cpu.sh (runs/cifar-cpu/ATTACK-none);
#   gtsrb:        the paper's own setting in spirit (linf_pruning.md section 6): GTSRB at 32x32, the AlexNet-style
#                 net at width 2 (32-96-192-128-128), BadNets 4x4 white square at rows/cols 27-30, target 33, 10 %,
#                 trained first into runs/gtsrb-cpu/badnets-none.
# Usage: benchmarks/prune_cpu.sh cifar ATTACK | gtsrb [THREADS]. A finished run (results.json present) is skipped.
set -euo pipefail
SETTING=${1:?usage: prune_cpu.sh cifar ATTACK | gtsrb [THREADS]}
if [[ $SETTING == cifar ]]; then
    ATTACK=${2:?usage: prune_cpu.sh cifar ATTACK [THREADS]}
    THREADS=${3:-0}
    DATA=(--dataset cifar10 --data-root "${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}")
    MODEL=runs/cifar-cpu/$ATTACK-none/model.safetensors
    OUT=runs/cifar-cpu-prune
elif [[ $SETTING == gtsrb ]]; then
    ATTACK=badnets
    THREADS=${2:-0}
    DATA=(--dataset gtsrb --data-root "${GTSRB:-../shared/data/gtsrb.tar.xz}")
    MODEL=runs/gtsrb-cpu/badnets-none/model.safetensors
    OUT=runs/gtsrb-cpu-prune
    if [[ ! -f runs/gtsrb-cpu/badnets-none/results.json ]]; then
        /usr/bin/time -f "gtsrb badnets-none wall %e s" bdguard train "${DATA[@]}" --model alexnet \
            --set train.model_kwargs.width=2 --epochs 4 --lr 0.05 --schedule onecycle --threads "$THREADS" \
            --attack badnets --target 33 --rate 0.1 --set patch_size=4 --set pattern=white --set margin=1 \
            --quiet --out runs/gtsrb-cpu/badnets-none --resume
    fi
else
    echo "unknown setting $SETTING (cifar or gtsrb)" >&2
    exit 2
fi

# NAME DEFENSE [KEY=VALUE]: one pruning run of $MODEL into $OUT/$ATTACK-NAME
for spec in "linf-prune-oracle linf-prune trigger=oracle" "l2-prune-oracle l2-prune trigger=oracle" \
    "l1-prune-oracle l1-prune trigger=oracle" "linf-prune-reverse linf-prune trigger=reverse" \
    "random-prune random-prune" "fine-pruning fine-pruning" "clp clp" "neural-cleanse neural-cleanse"; do
    read -r name defense setting <<<"$spec"
    if [[ -f $OUT/$ATTACK-$name/results.json ]]; then
        echo "skip $ATTACK-$name (finished)"
        continue
    fi
    /usr/bin/time -f "$ATTACK-$name wall %e s" bdguard prune --model "$MODEL" "${DATA[@]}" --defense "$defense" \
        ${setting:+--set "$setting"} --threads "$THREADS" --quiet --out "$OUT/$ATTACK-$name"
done
