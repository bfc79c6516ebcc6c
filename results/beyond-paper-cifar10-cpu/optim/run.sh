#!/usr/bin/env bash
# Reproduces results/beyond-paper-cifar10-cpu/optim (2026-12-07) from the repository root: the later
# optimiser rows of studies/beyond_paper.toml (study.toml here; seeds 1 and 2) at the scale of
# results/paper-table6-cifar10-cpu: a 5,000-image class-balanced subset of CIFAR-10's training
# set (the full 10,000 test images evaluate, after epochs 5 and 10), 10 epochs, batch 128,
# 1 warmup epoch, cosine decay, mixup off for the last 2 epochs (the config's 5 of 30), fp32 +
# channels_last (this CPU has no bf16), two runs at once on one thread each.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
DATA=${CIFAR10_DIR:-../shared/data/cifar10}
$T ablate --study results/beyond-paper-cifar10-cpu/optim/study.toml --out runs/beyond-paper-cifar10-cpu-optim \
    --jobs 2 --set "data.dir=\"$DATA\"" --set train.epochs=10 --set 'train.precision="fp32"' \
    --set train.channels_last=true --set data.workers=1 --set train.keep_checkpoints=1 \
    --set data.train_limit=5000 --set train.threads=1 --set optim.warmup_epochs=1 \
    --set mixup.off_epochs=2 --set train.eval_every=5
