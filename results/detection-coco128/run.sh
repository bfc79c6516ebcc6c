#!/usr/bin/env bash
# Reproduces results/detection-coco128 (2026-12-07, second run) from the repository root:
# 1. a ResNet-18-D backbone on Imagenette (the transfer study's recipe: 112 px, cosine, 10 epochs),
# 2. Faster R-CNN + FPN on coco128 from that backbone: 12 epochs, lr 0.01 (2 warm-up epochs, cosine),
#    gradient clipping at 10, evaluated every 3 epochs on val2017,
# 3. the last checkpoint evaluated on val2017 and on its own training images (train2017).
# train.threads = 0 follows the cores other processes leave free (the runs shared the 2-core VM
# with other work); fix it for a bit-reproducible run.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
$T train --config configs/imagenet/resnet50d-imagenette.toml \
    --set model.name=resnet18 --set model.variant=d \
    --set train.epochs=10 --set optim.warmup_epochs=1 \
    --set data.train_size=112 --set data.val_size=128 \
    --set train.channels_last=true --set train.threads=0 --set data.workers=1 \
    --out runs/imagenette-r18d/cosine
$T train --config configs/coco128/fasterrcnn_resnet18d.toml --out runs/coco128/r18d-imagenette \
    --set detect.backbone=runs/imagenette-r18d/cosine/best.safetensors \
    --set train.epochs=12 --set optim.lr=0.01 --set optim.warmup_epochs=2 \
    --set optim.clip_grad_norm=10.0 --set train.eval_every=3 \
    --set train.threads=0 --set data.workers=1
$T eval --checkpoint runs/coco128/r18d-imagenette/checkpoints/epoch-0012.safetensors
$T eval --checkpoint runs/coco128/r18d-imagenette/checkpoints/epoch-0012.safetensors --split train2017
