#!/usr/bin/env bash
# Reproduces results/paper-table6-cifar10-cpu/five-seeds (2026-12-07, late evening) from the
# repository root: run.sh's Table 6 study and its efficient-step row with seeds 1-5 instead of
# 1-3, all settings as run.sh's (5,000-image subsets, 10 epochs, batch 128, two runs at once on one
# thread each, fp32 + channels_last). The teacher is run.sh's command; its metrics are compared with
# the committed teacher's, which says whether the distillation rows learn from the same teacher as
# run.sh's did. Finished runs are skipped, so a stopped call resumes where it was.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
DATA=${CIFAR10_DIR:-../shared/data/cifar10}
R=results/paper-table6-cifar10-cpu
common=(--set "data.dir=\"$DATA\"" --set train.epochs=10
    --set train.channels_last=true --set data.workers=1 --set train.keep_checkpoints=1)
[[ -f runs/paper/teacher-cifar10/summary.json ]] ||
    $T train --config configs/cifar10/resnet56.toml --out runs/paper/teacher-cifar10 \
        "${common[@]}" --set data.train_limit=10000 --set train.threads=2 --set optim.schedule='"cosine"' \
        --set loss.label_smoothing=0.1 --set optim.warmup_epochs=1
python3 - runs/paper/teacher-cifar10/metrics.jsonl $R/teacher/metrics.jsonl <<'PY'
import json, sys
keys = ("train_loss", "val_top1", "val_loss")
now, then = ([[json.loads(l)[k] for k in keys] for l in open(p)] for p in sys.argv[1:])
print("teacher:", "the same per-epoch losses and top-1 as the committed teacher" if now == then
      else f"differs from the committed teacher (final val top-1 {now[-1][1]} against {then[-1][1]})")
PY
student=(--jobs 2 --seeds 1,2,3,4,5 "${common[@]}" --set data.train_limit=5000 --set train.threads=1
    --set train.batch_size=128 --set optim.warmup_epochs=1 --set train.eval_every=5)
$T ablate --study studies/paper/table6_refinements_cifar10.toml \
    --out runs/paper/table6-cifar10-cpu-5seeds "${student[@]}"
$T ablate --study $R/efficient-step.toml \
    --out runs/paper/table6-cifar10-cpu-efficient-step-5seeds "${student[@]}"
