#!/usr/bin/env bash
# The pruning benchmarks of benchmarks/RESULTS.md (issue 5): every pruning defense on one backdoored model.
#   cifar ATTACK: the undefended small-CNN model of benchmarks/cifar_cpu.sh (runs/cifar-cpu/ATTACK-none);
#   gtsrb:        the paper's own setting in spirit (linf_pruning.md section 6): GTSRB at 32x32, the AlexNet-style
#                 net at width 2 (32-96-192-128-128), BadNets 4x4 white square at rows/cols 27-30, target 33, 10 %,
#                 trained first into runs/gtsrb-cpu/badnets-none.
# Usage: benchmarks/prune_cpu.sh cifar ATTACK | gtsrb [THREADS]. A finished run (results.json present) is skipped.
# RUNS (default runs) is the folder both read from and written to.
# SMOKE=1 (the check in tests/test_benchmarks.py): the same steps on the synthetic set (cifar: the model of
# `SMOKE=1 OUT=$RUNS/cifar-cpu cifar_cpu.sh attacks`; gtsrb: target 0 of its 10 classes, 1 epoch), a probe of 200 of
# its 500 test images (the default probe would take them all), trigger reverse-engineering in 30 steps instead of 300,
# one thread unless THREADS is given.
set -euo pipefail
SETTING=${1:?usage: prune_cpu.sh cifar ATTACK | gtsrb [THREADS]}
RUNS=${RUNS:-runs}
if [[ ${SMOKE:-} == 1 ]]; then
    DEFAULT_THREADS=1
    CIFAR_DATA=(--dataset synthetic)
    GTSRB_DATA=(--dataset synthetic)
    GTSRB_TARGET=0 GTSRB_EPOCHS=1
    PROBE=(--probe-size 200)
    declare -A QUICK=([linf-prune]="--set nc_steps=30" [neural-cleanse]="--set steps=30")
else
    DEFAULT_THREADS=0
    CIFAR_DATA=(--dataset cifar10 --data-root "${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}")
    GTSRB_DATA=(--dataset gtsrb --data-root "${GTSRB:-../shared/data/gtsrb.tar.xz}")
    GTSRB_TARGET=33 GTSRB_EPOCHS=4
    PROBE=()
    declare -A QUICK=()
fi
if [[ $SETTING == cifar ]]; then
    ATTACK=${2:?usage: prune_cpu.sh cifar ATTACK [THREADS]}
    THREADS=${3:-$DEFAULT_THREADS}
    DATA=("${CIFAR_DATA[@]}")
    MODEL=$RUNS/cifar-cpu/$ATTACK-none/model.safetensors
    OUT=$RUNS/cifar-cpu-prune
elif [[ $SETTING == gtsrb ]]; then
    ATTACK=badnets
    THREADS=${2:-$DEFAULT_THREADS}
    DATA=("${GTSRB_DATA[@]}")
    MODEL=$RUNS/gtsrb-cpu/badnets-none/model.safetensors
    OUT=$RUNS/gtsrb-cpu-prune
    if [[ ! -f $RUNS/gtsrb-cpu/badnets-none/results.json ]]; then
        /usr/bin/time -f "gtsrb badnets-none wall %e s" bdguard train "${DATA[@]}" --model alexnet \
            --set train.model_kwargs.width=2 --epochs "$GTSRB_EPOCHS" --lr 0.05 --schedule onecycle \
            --threads "$THREADS" --attack badnets --target "$GTSRB_TARGET" --rate 0.1 --set patch_size=4 \
            --set pattern=white --set margin=1 --quiet --out "$RUNS/gtsrb-cpu/badnets-none" --resume
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
    # shellcheck disable=SC2086  # QUICK's flags are words
    /usr/bin/time -f "$ATTACK-$name wall %e s" bdguard prune --model "$MODEL" "${DATA[@]}" --defense "$defense" \
        ${setting:+--set "$setting"} ${QUICK[$defense]:-} "${PROBE[@]}" --threads "$THREADS" --quiet \
        --out "$OUT/$ATTACK-$name"
done
