#!/usr/bin/env bash
# V&B's ablation (issue 13): which part of V&B costs which accuracy and which time, beside undefended training of
# the same budget, schedule shape, augmentation and machine load.
#
# Usage: benchmarks/vab_ablation.sh SETTING ATTACK VARIANT... [-- EXTRA FLAGS]
#   SETTING: fmnist (Fashion-MNIST, TRAIN_SIZE images (default 20,000), small-cnn, EPOCHS epochs (default 30),
#            one-cycle lr 0.05) or cifar (CIFAR-10 JPEG copy, resnet20, EPOCHS (default 20), one-cycle lr 0.1)
#   ATTACK:  badnets, blended, wanet or sig (sig poisons SIG_RATE of the target class, default 0.5; the others RATE
#            of the set, default 0.1)
#   SEED:    training and attack seed (default 0); a seed other than 0, or a RATE, names the folder SETTING-ATTACK-sSEED
#            or SETTING-ATTACK-rRATE
#   VARIANT: a name below; `all` runs every one in order.
# Each run lands in $OUT/SETTING-ATTACK/VARIANT (default OUT=runs/vab-ablation), resumes from its checkpoint and is
# skipped once finished; `python benchmarks/collect.py --ratio $OUT/SETTING-ATTACK` prints the table.
# THREADS: torch threads (default 0, torch's choice).
# SMOKE=1 (the check in tests/test_benchmarks.py): the variants on the synthetic set with the small CNN, 1 epoch, one
# thread unless THREADS is given; SETTING still names the folder.
set -euo pipefail
SETTING=${1:?usage: vab_ablation.sh fmnist|cifar ATTACK VARIANT...}
ATTACK=${2:?usage: vab_ablation.sh fmnist|cifar ATTACK VARIANT...}
shift 2
OUT=${OUT:-runs/vab-ablation}
case $SETTING in
fmnist)
    COMMON=(--dataset fashion-mnist --train-size "${TRAIN_SIZE:-20000}" --model small-cnn --epochs "${EPOCHS:-30}"
        --lr 0.05 --schedule onecycle)
    ;;
cifar)
    COMMON=(--dataset cifar10 --data-root "${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}" --model resnet20
        --epochs "${EPOCHS:-20}" --lr 0.1 --schedule onecycle)
    ;;
*) echo "unknown setting $SETTING" >&2; exit 2 ;;
esac
if [[ ${SMOKE:-} == 1 ]]; then
    COMMON=(--dataset synthetic --model small-cnn --epochs 1 --lr 0.05 --schedule onecycle)
    THREADS=${THREADS:-1}
fi
case $ATTACK in
sig) POISON=(--attack sig --rate "${SIG_RATE:-0.5}") ;;
*) POISON=(--attack "$ATTACK" --rate "${RATE:-0.1}") ;;
esac
SEED=${SEED:-0}
COMMON+=("${POISON[@]}" --target 0 --seed "$SEED" --attack-seed "$SEED" --threads "${THREADS:-0}" --quiet)
CELL=$SETTING-$ATTACK${RATE:+-r$RATE}
[[ $SEED == 0 ]] || CELL+=-s$SEED

# name: the flags of the variant. "paper" is the reference method rescaled to the budget (V&B's own step schedule,
# two views, AttentionMix on every image, the Victim after every epoch at these budgets) with the Victim alike the
# Beneficiary so it fits a CPU. The "filter" rows build the method up from the Victim's split; the other rows start
# from the default and change one lever ("refine": the Beneficiary's take-back of docs/methods/vab.md to the end of
# the run, on the Victim's global split; the 10-epoch `mix` and `half-mix` rows of RESULTS were run on top of it).
# "global" is the default without the label rule, "round-two" the default of the round before it (the global split,
# refined during the first fifth of the run); "suppress" is round three's default (the reference's stage B), and the
# label-rule rows measured in round three keep it; "holds" lets the check model's agreement keep a sample of the
# attacked label credible (round five).
declare -A VARIANTS=(
    [none]="--defense none"
    [paper]="--defense vab --set vab.preset=cpu"
    [default]="--defense vab"
    [global]="--defense vab --set vab.split_rule=global"
    [round-two]="--defense vab --set vab.split_rule=global --set vab.refine=true"
    [no-check-flags]="--defense vab --set vab.stage_b=suppress --set vab.check_flags=off"
    [all-check-flags]="--defense vab --set vab.stage_b=suppress --set vab.check_flags=all"
    [otsu]="--defense vab --set vab.stage_b=suppress --set vab.label_within=otsu"
    [suppress]="--defense vab --set vab.stage_b=suppress"
    [suppress-attacked]="--defense vab --set vab.stage_b=suppress --set vab.suppress_labels=attacked"
    [filter]="--defense vab --set vab.split_rule=global --set vab.stage_a_fraction=1"
    [filter-mix]="--defense vab --set vab.split_rule=global --set vab.mix_share=1 --set vab.stage_a_fraction=1"
    [filter-mix-b]="--defense vab --set vab.split_rule=global --set vab.mix_share=1"
    [refine]="--defense vab --set vab.split_rule=global --set vab.refine=true --set vab.refine_until=1"
    [label-gate]="--defense vab --set vab.split_rule=global --set vab.refine=true --set vab.refine_until=1 --set vab.refine_label_share=0.5"
    [mix]="--defense vab --set vab.split_rule=global --set vab.refine=true --set vab.refine_until=1 --set vab.mix_share=1"
    [half-mix]="--defense vab --set vab.split_rule=global --set vab.refine=true --set vab.refine_until=1 --set vab.mix_share=0.5"
    [no-stage-b]="--defense vab --set vab.stage_a_fraction=1"
    [refine-suppress-a]="--defense vab --set vab.split_rule=global --set vab.refine=true --set vab.refine_until=1 --set vab.suppress_stage_a=true"
    [relabel]="--defense vab --set vab.stage_b=relabel"
    [unlearn-diverse]="--defense vab --set vab.unlearn_among=diverse"
    [holds]="--defense vab --set vab.check_holds=true"
    [two-views]="--defense vab --set vab.views=2"
    [vab-schedule]="--defense vab --set vab.lr_schedule=vab"
)
ORDER=(none paper default global round-two no-check-flags all-check-flags otsu suppress suppress-attacked relabel unlearn-diverse holds filter filter-mix filter-mix-b refine label-gate mix half-mix no-stage-b refine-suppress-a two-views vab-schedule)

EXTRA=()
NAMES=()
while (($#)); do
    if [[ $1 == -- ]]; then
        shift
        EXTRA=("$@")
        break
    fi
    NAMES+=("$1")
    shift
done
[[ ${NAMES[0]:-} == all ]] && NAMES=("${ORDER[@]}")

for name in "${NAMES[@]}"; do
    [[ -n ${VARIANTS[$name]+x} ]] || { echo "unknown variant $name (known: ${ORDER[*]})" >&2; exit 2; }
    dir=$OUT/$CELL/$name
    if [[ -f $dir/results.json ]]; then
        echo "skip $dir (finished)"
        continue
    fi
    # shellcheck disable=SC2086  # the variant's flags are words
    echo "run $dir: bdguard train ${COMMON[*]} ${VARIANTS[$name]} ${EXTRA[*]}"
    bdguard train "${COMMON[@]}" ${VARIANTS[$name]} "${EXTRA[@]}" --out "$dir" --resume
done
