#!/usr/bin/env bash
# Reproduces results/detection-coco128/first-run (2026-12-07, morning) from the repository root:
# 1. a ResNet-18-D backbone on Imagenette (the transfer study's recipe, cut short: see RESULTS.md),
# 2. Faster R-CNN + FPN on coco128 from that backbone, 4 epochs, gradient clipping at 10.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
$T train --config configs/imagenet/resnet50d-imagenette.toml \
    --set model.name=resnet18 --set model.variant=d \
    --set train.epochs=10 --set optim.warmup_epochs=1 \
    --set data.train_size=112 --set data.val_size=128 \
    --set train.channels_last=true --set train.threads=1 --set data.workers=1 \
    --out runs/imagenette-r18d/cosine   # stopped (SIGTERM) after epoch 5 of 10 on 2026-12-07
$T train --config configs/coco128/fasterrcnn_resnet18d.toml --out runs/coco128/r18d-imagenette-clip \
    --set detect.backbone=runs/imagenette-r18d/cosine/best.safetensors \
    --set train.epochs=4 --set optim.clip_grad_norm=10.0 \
    --set train.threads=2 --set data.workers=2
$T eval --checkpoint runs/coco128/r18d-imagenette-clip/checkpoints/epoch-0004.safetensors
