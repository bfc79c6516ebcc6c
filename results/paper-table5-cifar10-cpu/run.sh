#!/usr/bin/env bash
# Reproduces results/paper-table5-cifar10-cpu (2026-12-07) from the repository root: the paper's
# Table 5 (studies/paper/table5_tweaks_cifar10.toml, ResNet-20 A/B/C/D) at the scale of
# results/paper-table6-cifar10-cpu: a 5,000-image class-balanced subset of CIFAR-10's training
# set (the full 10,000 test images evaluate, after epochs 5 and 10), 10 epochs, 3 seeds, batch 128
# (lr 0.1) instead of 1024, 1 warmup epoch, the step decay (x0.1) at epochs 5 and 8 (the base
# config's 50 % and 75 %), fp32 + channels_last (this CPU has no bf16), one run at a time on one
# thread beside other work. B builds the same network as A on CIFAR (a control).
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
DATA=${CIFAR10_DIR:-../shared/data/cifar10}
$T ablate --study studies/paper/table5_tweaks_cifar10.toml --out runs/paper/table5-cifar10-cpu \
    --jobs 1 --seeds 1,2,3 --set "data.dir=\"$DATA\"" --set train.epochs=10 \
    --set train.channels_last=true --set data.workers=1 --set train.keep_checkpoints=1 \
    --set data.train_limit=5000 --set train.threads=1 --set train.batch_size=128 \
    --set optim.warmup_epochs=1 --set "optim.step_epochs=[5, 8]" --set train.eval_every=5
