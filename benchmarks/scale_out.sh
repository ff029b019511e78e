#!/usr/bin/env bash
# Scale-out figures of benchmarks/RESULTS.md (issue 17): the smoke suite's wall time serially, in 2 local worker
# processes and as Ray tasks on a 2-CPU local Ray (the same tables each time), and an epoch of plain training and of
# V&B on 20,000 Fashion-MNIST images in one process (2 threads) against two torchrun ranks (1 thread each). Run from
# the repository root with bdguard[dev] installed, on an otherwise idle machine; it prints `real` times and BA/ASR.
# SMOKE=1 (the check in tests/test_benchmarks.py): four of the seven commands on their smallest meaningful piece,
# not the figures: the suite cut to one undefended BadNets cell and one spectral detection (which waits for the
# cell's model, so each executor still orders steps), one thread, serially and in 2 local workers; plain training on
# the synthetic set, 1 epoch, in one process and on two ranks. The Ray bench and the two V&B trainings are left to
# tests/test_bench.py (Ray, 2 workers, the serial tables) and tests/test_distributed.py (V&B on two ranks against
# one process), which run the same commands.
set -euo pipefail
OUT=${OUT:-runs/scale-out}
if [[ ${SMOKE:-} == 1 ]]; then
    SUITE=(--suite smoke --attacks badnets --defenses none --detectors spectral --threads 1)
    RUN="train --dataset synthetic --attack badnets --rate 0.1 --model small-cnn --epochs 1"
    ONE_PROCESS_THREADS=1
else
    SUITE=(--suite smoke)
    RUN="train --dataset fashion-mnist --train-size 20000 --attack badnets --rate 0.1 --model small-cnn --epochs 2"
    ONE_PROCESS_THREADS=2
fi
rm -rf "$OUT"
time bdguard bench "${SUITE[@]}" --out "$OUT/smoke-serial" --quiet
time bdguard bench "${SUITE[@]}" --executor local --workers 2 --out "$OUT/smoke-local2" --quiet
[[ ${SMOKE:-} == 1 ]] || time bdguard bench "${SUITE[@]}" --executor ray --workers 2 --out "$OUT/smoke-ray2" --quiet

RUN="$RUN --batch-size 128 --lr 0.05 --schedule onecycle --quiet"
time bdguard $RUN --threads "$ONE_PROCESS_THREADS" --out "$OUT/none-1proc"
time torchrun --standalone --nproc-per-node 2 -m bdguard $RUN --threads 1 --out "$OUT/none-2ranks"
[[ ${SMOKE:-} == 1 ]] && exit 0
time bdguard $RUN --defense vab --threads "$ONE_PROCESS_THREADS" --out "$OUT/vab-1proc"
time torchrun --standalone --nproc-per-node 2 -m bdguard $RUN --defense vab --threads 1 --out "$OUT/vab-2ranks"
