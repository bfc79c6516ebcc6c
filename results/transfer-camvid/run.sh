#!/usr/bin/env bash
# Reproduces results/transfer-camvid (issue 7's real result) from the repository root:
# 1. a ResNet-18-D backbone trained on Imagenette (16 epochs, 112 px train / 128 px eval, cosine),
# 2. the FCN recipe on CamVid from that backbone and from random init, through `tricks ablate`.
# study/'s table, CSV, study.json and plots were regenerated from the same runs on 2026-12-07 with
# `tricks report results/transfer-camvid/study` (metrics named mIoU / pixel accuracy, the
# confidence intervals and verdicts); no run was retrained.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
$T train --config configs/imagenet/resnet50d-imagenette.toml \
    --set model.name=resnet18 --set model.variant=d \
    --set train.epochs=16 --set optim.warmup_epochs=1 \
    --set data.train_size=112 --set data.val_size=128 \
    --set train.precision=bf16 --set train.channels_last=true \
    --out runs/imagenette-r18d/cosine
$T ablate --study studies/transfer_camvid_quick.toml --out runs/transfer-camvid
