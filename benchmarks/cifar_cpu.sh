#!/usr/bin/env bash
# The CPU benchmarks of benchmarks/RESULTS.md on CIFAR-10 (JPEG q75 copy) with the small CNN, 6 epochs:
#   attacks: undefended BA/ASR of a clean run and of all seven attacks (issue 3);
#   vab:     V&B on BadNets, Blended, WaNet and SIG, beside the undefended runs of the same budget (issue 4).
# Usage: benchmarks/cifar_cpu.sh attacks|vab [THREADS]. The two queues may run at once, one thread each. Every run
# resumes from its checkpoint and a finished run (results.json present) is skipped, so a killed queue just restarts.
# SMOKE=1 (the check in tests/test_benchmarks.py): the same cells on the synthetic set, one epoch everywhere (IAD's
# generator and mask too), one thread unless THREADS is given.
set -euo pipefail
QUEUE=${1:?usage: cifar_cpu.sh attacks|vab [THREADS]}
OUT=${OUT:-runs/cifar-cpu}
if [[ ${SMOKE:-} == 1 ]]; then
    THREADS=${2:-1}
    DATA=(--dataset synthetic)
    EPOCHS=1 IAD_EPOCHS=1 IAD_MASK_EPOCHS=1
else
    THREADS=${2:-0}
    DATA=(--dataset cifar10 --data-root "${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}")
    EPOCHS=6 IAD_EPOCHS=5 IAD_MASK_EPOCHS=2
fi
COMMON=("${DATA[@]}" --model small-cnn --epochs "$EPOCHS" --lr 0.05 --threads "$THREADS" --quiet)
# the clean surrogate LC and Trojan learn from, and IAD's joint classifier: the same small CNN, shorter budgets
SURROGATE=(--set surrogate_model=small-cnn --set surrogate_epochs="$EPOCHS")

cell() {  # cell NAME ARGS...: one training run into $OUT/NAME
    local name=$1
    shift
    if [[ -f $OUT/$name/results.json ]]; then
        echo "skip $name (finished)"
        return
    fi
    echo "run $name: $*"
    /usr/bin/time -f "$name wall %e s" bdguard train "${COMMON[@]}" "$@" --out "$OUT/$name" --resume
}

undefended() {  # undefended ATTACK [ARGS...]
    local attack=$1
    shift
    cell "$attack-none" --attack "$attack" --target 0 --defense none --schedule onecycle "$@"
}

case $QUEUE in
attacks)
    undefended badnets --rate 0.1
    undefended blended --rate 0.1
    undefended wanet --rate 0.1
    undefended sig --rate 0.1
    cell clean --attack none --defense none --schedule onecycle
    undefended trojan --rate 0.1 "${SURROGATE[@]}"
    undefended lc --rate 0.1 "${SURROGATE[@]}"
    undefended iad --rate 0.1 --set classifier=small-cnn --set epochs="$IAD_EPOCHS" --set mask_epochs="$IAD_MASK_EPOCHS"
    ;;
vab)
    for attack in badnets blended wanet sig; do
        cell "$attack-vab" --attack "$attack" --rate 0.1 --target 0 --defense vab --set vab.preset=cpu
    done
    ;;
*)
    echo "unknown queue $QUEUE (attacks or vab)" >&2
    exit 2
    ;;
esac
