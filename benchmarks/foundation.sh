#!/usr/bin/env bash
# The foundation benchmarks of benchmarks/RESULTS.md: training throughput of the small ResNet on CIFAR-10 (JPEG q75
# copy), the share of an epoch spent in the data pipeline, and an undefended BadNets run. Run from the repository
# root with bdguard installed; CIFAR defaults to the offline archive beside the checkout.
set -euo pipefail
CIFAR=${CIFAR:-../shared/data/cifar10-jpeg.tar.xz}
OUT=${OUT:-runs}

python benchmarks/throughput.py --dataset cifar10 --data-root "$CIFAR" --model resnet20 --epochs 1
python benchmarks/throughput.py --dataset fashion-mnist --model small-cnn --epochs 1
bdguard train --dataset cifar10 --data-root "$CIFAR" --attack badnets --rate 0.1 --target 0 \
    --model resnet20 --epochs 6 --schedule onecycle --lr 0.1 --out "$OUT/bench-badnets-resnet20" --quiet
