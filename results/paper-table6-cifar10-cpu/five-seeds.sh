#!/usr/bin/env bash
# Reproduces results/paper-table6-cifar10-cpu/five-seeds (2026-12-07 to 08) from the repository
# root: run.sh's Table 6 study and its efficient-step row with seeds 1-5 instead of 1-3, every
# setting as run.sh's. Then the teacher run.sh trained is compared with the committed one, which
# says whether the distillation rows learnt from the same teacher as run.sh's did. Finished runs
# are skipped, so a stopped call resumes where it was.
set -euo pipefail
R=results/paper-table6-cifar10-cpu
SEEDS=1,2,3,4,5 OUT=runs/paper/table6-cifar10-cpu-5seeds bash $R/run.sh
python3 - runs/paper/teacher-cifar10/metrics.jsonl $R/teacher/metrics.jsonl <<'PY'
import json, sys
keys = ("train_loss", "val_top1", "val_loss")
now, then = ([[json.loads(l)[k] for k in keys] for l in open(p)] for p in sys.argv[1:])
print("teacher:", "the same per-epoch losses and top-1 as the committed teacher" if now == then
      else f"differs from the committed teacher (final val top-1 {now[-1][1]} against {then[-1][1]})")
PY
