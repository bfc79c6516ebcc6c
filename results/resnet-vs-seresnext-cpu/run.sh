#!/usr/bin/env bash
# Reproduces results/resnet-vs-seresnext-cpu from the repository root: study.toml here (the CPU
# scale of studies/resnet_vs_seresnext.toml); ablate writes the table, CSV and plots.
# train.threads = 0 follows the cores other processes leave free; fix it for a bit-reproducible run.
set -euo pipefail
T=${TRICKS:-./target/release/tricks}
$T ablate --study results/resnet-vs-seresnext-cpu/study.toml --out runs/resnet-vs-seresnext-cpu \
    --set train.threads=0 --set data.workers=1 --set train.keep_checkpoints=1
