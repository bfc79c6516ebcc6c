#!/usr/bin/env bash
# Reproduces results/transfer-table8 (the paper's Table 8 at this CPU's scale) from the repository root.
# 1. Four ResNet-18-D backbones on Imagenette with the recipe of results/detection-coco128
#    (112 px train / 128 px eval, batch 64, lr 0.025 with 1 warm-up epoch, 10 epochs, fp32 +
#    channels_last), differing only in the refinements: step decay (x0.1 at epochs 5 and 8, the
#    50 % / 75 % points the repository's studies use), cosine decay, + label smoothing 0.1,
#    + mixup 0.2. The cosine backbone is results/detection-coco128's (same command); it is trained
#    only when runs/imagenette-r18d/cosine is missing.
# 2. Segmentation transfer: studies/transfer_segmentation.toml's four backbone rows on CamVid
#    (segmentation/study.toml), 10 epochs, seeds 1 and 2.
# train.threads = 0 follows the cores other processes leave free; fix it for a bit-reproducible run.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
B="--config configs/imagenet/resnet50d-imagenette.toml --set model.name=resnet18 --set model.variant=d
   --set train.epochs=10 --set optim.warmup_epochs=1 --set data.train_size=112 --set data.val_size=128
   --set train.channels_last=true --set train.threads=0 --set data.workers=1"
backbone() { # NAME [--set ...]
    local name=$1; shift
    [ -f runs/imagenette-r18d/$name/summary.json ] || $T train $B "$@" --out runs/imagenette-r18d/$name
}
backbone step --set optim.schedule=step --set 'optim.step_epochs=[5, 8]'
backbone cosine
backbone cosine-ls --set loss.label_smoothing=0.1
backbone cosine-ls-mixup --set loss.label_smoothing=0.1 --set mixup.alpha=0.2
$T ablate --study results/transfer-table8/segmentation/study.toml --out runs/transfer-table8-seg \
    --set train.epochs=10 --set train.channels_last=true --set train.threads=0 --set data.workers=1 \
    --set train.keep_checkpoints=1
# 3. Detection transfer: the detector recipe of results/detection-coco128 at 6 epochs (about 23
#    minutes per run on the 2-core VM), one seed.
$T ablate --study results/transfer-table8/detection/study.toml --out runs/transfer-table8-det \
    --set train.threads=0 --set data.workers=1 --set train.keep_checkpoints=1
# 4. Each detector's last weights on its own training images (how well it fits them).
#    keep_checkpoints = 1 leaves one checkpoint per run, its last epoch's.
for r in runs/transfer-table8-det/runs/*/seed-1; do
    last=$(ls "$r"/checkpoints/epoch-*.safetensors | tail -n 1)
    $T eval --checkpoint "$last" --split train2017 >"$r/eval-train2017.txt"
done
