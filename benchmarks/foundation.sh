#!/usr/bin/env bash
# The foundation benchmarks of benchmarks/RESULTS.md: training throughput of the small ResNet on CIFAR-10 (JPEG q75
# copy), the share of an epoch spent in the data pipeline, and an undefended BadNets run. Run from the repository
# root with bdguard installed; CIFAR defaults to the offline archive beside the checkout.
# SMOKE=1 (the check in tests/test_benchmarks.py): the same three commands on the synthetic set with the small CNN,
# one epoch and one thread, the run into OUT.
set -euo pipefail
OUT=${OUT:-runs}
if [[ ${SMOKE:-} == 1 ]]; then
    CIFAR_DATA=(--dataset synthetic)
    FMNIST_DATA=(--dataset synthetic)
    MODEL=small-cnn EPOCHS=1
    THREADS=(--threads 1)
else
    CIFAR_DATA=(--dataset cifar10 --data-root "${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}")
    FMNIST_DATA=(--dataset fashion-mnist)
    MODEL=resnet20 EPOCHS=6
    THREADS=()
fi

python benchmarks/throughput.py "${CIFAR_DATA[@]}" --model "$MODEL" --epochs 1 "${THREADS[@]}"
python benchmarks/throughput.py "${FMNIST_DATA[@]}" --model small-cnn --epochs 1 "${THREADS[@]}"
bdguard train "${CIFAR_DATA[@]}" --attack badnets --rate 0.1 --target 0 \
    --model "$MODEL" --epochs "$EPOCHS" --schedule onecycle --lr 0.1 "${THREADS[@]}" \
    --out "$OUT/bench-badnets-$MODEL" --quiet
