#!/usr/bin/env bash
# Reproduces results/paper-table6-cifar10-cpu (2026-12-07) from the repository root: the paper's
# Table 6 (studies/paper/table6_refinements_cifar10.toml) scaled to what a 2-core CPU runs in
# about an hour beside other work: a 5,000-image class-balanced subset of CIFAR-10's training set
# (the full 10,000 test images evaluate, after epochs 5 and 10), 10 epochs, 3 seeds, batch 128
# (lr 0.1 by linear scaling) instead of 1024, 1 warmup epoch, fp32 + channels_last (this CPU has
# no bf16), two runs at once on one thread each. The distillation teacher is a CIFAR ResNet-56
# with cosine decay and label smoothing, trained first on a 10,000-image subset (of its own seed)
# for 10 epochs (62.5 % top-1).
# SEEDS and OUT (defaults: what ran, 1,2,3 into runs/paper/table6-cifar10-cpu) let five-seeds.sh run
# the same studies with more seeds.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
SEEDS=${SEEDS:-1,2,3}
OUT=${OUT:-runs/paper/table6-cifar10-cpu}
DATA=${CIFAR10_DIR:-../shared/data/cifar10}
common=(--set "data.dir=\"$DATA\"" --set train.epochs=10
    --set train.channels_last=true --set data.workers=1 --set train.keep_checkpoints=1)
[[ -f runs/paper/teacher-cifar10/summary.json ]] ||
    $T train --config configs/cifar10/resnet56.toml --out runs/paper/teacher-cifar10 \
        "${common[@]}" --set data.train_limit=10000 --set train.threads=2 --set optim.schedule='"cosine"' \
        --set loss.label_smoothing=0.1 --set optim.warmup_epochs=1
$T ablate --study studies/paper/table6_refinements_cifar10.toml --out "$OUT" \
    --jobs 2 --seeds "$SEEDS" "${common[@]}" --set data.train_limit=5000 --set train.threads=1 \
    --set train.batch_size=128 --set optim.warmup_epochs=1 --set train.eval_every=5
# The efficient row with its lr steps inside the 10 epochs (see efficient-step.toml).
$T ablate --study results/paper-table6-cifar10-cpu/efficient-step.toml \
    --out "$OUT-efficient-step" --jobs 1 --seeds "$SEEDS" "${common[@]}" \
    --set data.train_limit=5000 --set train.threads=1 --set train.batch_size=128 \
    --set optim.warmup_epochs=1 --set train.eval_every=5
