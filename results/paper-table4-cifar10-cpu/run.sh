#!/usr/bin/env bash
# Reproduces results/paper-table4-cifar10-cpu (2026-12-07) from the repository root: the paper's
# Table 4 (studies/paper/table4_efficient_cifar10.toml; cumulative, each row against the row
# above) at the scale of results/paper-table6-cifar10-cpu: a 5,000-image class-balanced subset
# of CIFAR-10's training set (the full 10,000 test images evaluate, after epochs 5 and 10),
# 10 epochs, 3 seeds, the step decay (x0.1) at epochs 5 and 8 in every row, fp32 + channels_last,
# one run at a time on one thread beside other work. The CPU rows (study.toml here) compare batch
# 64 with 256 (the paper's factor 4; 5,000 images at batch 1024 would be 4 steps an epoch), leave
# out bf16 and warm up for 1 epoch.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
DATA=${CIFAR10_DIR:-../shared/data/cifar10}
$T ablate --study results/paper-table4-cifar10-cpu/study.toml --out runs/paper/table4-cifar10-cpu \
    --jobs 1 --set "data.dir=\"$DATA\"" --set train.epochs=10 \
    --set train.channels_last=true --set data.workers=1 --set train.keep_checkpoints=1 \
    --set data.train_limit=5000 --set train.threads=1 --set "optim.step_epochs=[5, 8]" \
    --set train.eval_every=5
