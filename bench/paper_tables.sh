#!/usr/bin/env bash
# The paper's tables (studies/paper/) on the lent GPU, in one call: CIFAR-10 Tables 6, 4 and 5
# (CIFAR ResNet-20, 5 seeds; Table 6 after its distillation teacher, a ResNet-56), then Imagenette
# Tables 5 and 6 when IMAGENETTE_DIR names the 160-px JPEGs (they do not fit in the 64 MiB carry
# beside CIFAR-10); after each data set's tables, the study beyond the paper on it:
# studies/beyond_paper.toml (CIFAR-10) and studies/resnet_vs_seresnext.toml (Imagenette). Several
# runs share the GPU at once (`ablate --jobs`): a probe first measures runs per minute at JOBS_TRY
# (1 2 4) parallel runs and keeps the best. Every study runs with the data decoded once into GPU
# memory and channels_last; a study that does not fit in the time left (DEADLINE_S, 540 s) is
# skipped, and one cut short resumes where it stopped when the same --out is carried back (ablate
# skips finished runs). Output under $OUT/paper/: each study's table.md,
# results.csv, study.json and plots (checkpoints left out), paper-tables.md (every table), and
# the probe's figures.
#   cargo build --release && bash bench/gpu_pack.sh
#   run(command="bash bench/paper_tables.sh", carry=["data-local/gpu"], timeout_s=600)
# Smoke check of the same script on a CPU (1 epoch, Imagenette 2, on 1,024 training images):
#   DEVICE=cpu TINY=1 bash bench/paper_tables.sh
# Environment: BIN, CIFAR10_DIR (from data-local/gpu/ as bench/gpu.sh finds them), IMAGENETTE_DIR,
# DEVICE (cuda), EPOCHS (30; Imagenette 20), JOBS (skips the probe), JOBS_TRY, DEADLINE_S, OUT,
# TINY (1: the smoke setting), PY.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=bench/gpu_env.sh
source "$root/bench/gpu_env.sh"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$root/bench/out}"
DEADLINE_S="${DEADLINE_S:-540}"
TINY="${TINY:-0}"
JOBS_TRY="${JOBS_TRY:-1 2 4}"
CIFAR10_DIR="${CIFAR10_DIR:-$(unpack cifar10 "$root/../shared/data/cifar10")}"
if [[ "$DEVICE" == cuda ]]; then
    link_torch
    "$BIN" info | grep -q 'cuda: yes' || { echo "tricks sees no CUDA device" >&2; exit 3; }
fi
dest="$OUT/paper"
runs="$root/runs/paper"
mkdir -p "$dest" "$runs"
EPOCHS="${EPOCHS:-30}"
IMAGENETTE_EPOCHS="${IMAGENETTE_EPOCHS:-20}"
sets=(--set "data.dir=\"$CIFAR10_DIR\"" --set train.channels_last=true --set train.keep_checkpoints=1)
[[ "$DEVICE" == cuda ]] && sets+=(--set data.on_device=true --set train.untimed_warmup=false)
if [[ "$TINY" == 1 ]]; then
    # Imagenette 2 epochs: resnet_vs_seresnext's tricks row warms up over 2.
    EPOCHS=1 IMAGENETTE_EPOCHS=2
    sets+=(--set data.train_limit=1024 --set data.val_limit=512 --set train.batch_size=128
        --set optim.warmup_epochs=0)
    JOBS="${JOBS:-1}"
fi
left() { echo $((DEADLINE_S - SECONDS)); }
log="$dest/paper-tables.log"
say() { echo "$*" | tee -a "$log" >&2; }

# The probe: the same short study at each parallelism, runs per minute of wall time.
if [[ -z "${JOBS:-}" ]]; then
    best=1 best_rate=0
    for j in $JOBS_TRY; do
        t0=$SECONDS
        "$BIN" ablate --study studies/paper/table5_tweaks_cifar10.toml --out "$runs/probe-$j" \
            --device "$DEVICE" --jobs "$j" "${sets[@]}" --set train.epochs=2 >/dev/null 2>>"$log"
        dt=$((SECONDS - t0))
        rate=$(awk -v n=20 -v s="$dt" 'BEGIN { printf "%.2f", 60 * n / (s > 0 ? s : 1) }')
        say "probe: --jobs $j: 20 runs of 2 epochs in ${dt}s = $rate runs/min"
        echo "{\"jobs\": $j, \"seconds\": $dt, \"runs_per_min\": $rate}" >>"$dest/probe.jsonl"
        if awk -v a="$rate" -v b="$best_rate" 'BEGIN { exit !(a > b) }'; then best=$j best_rate=$rate; fi
    done
    JOBS=$best
    say "using --jobs $JOBS"
fi

# study out-name epochs [extra ablate args...]: runs it if the time left allows.
study() {
    local file="$1" name="$2" epochs="$3"
    shift 3
    if (($(left) < 30)); then
        say "skipped $name: $(left)s left"
        return
    fi
    say "study $name ($file, $epochs epochs, --jobs $JOBS, $(left)s left)"
    timeout "$(left)" "$BIN" ablate --study "$file" --out "$runs/$name" --device "$DEVICE" \
        --jobs "$JOBS" "${sets[@]}" --set "train.epochs=$epochs" "$@" 2>>"$log" | tee -a "$log" || true
    [[ -f "$runs/$name/study.json" ]] || { say "$name: no study output"; return; }
    "$BIN" report "$runs/$name" >/dev/null 2>>"$log" || true
    mkdir -p "$dest/$name"
    (cd "$runs/$name" && find . -name '*.safetensors' -prune -o -type f -print |
        tar -cf - -T - | tar -C "$dest/$name" -xf -)
}

# Table 6's teacher: CIFAR ResNet-56 with cosine decay and label smoothing.
teacher="$runs/teacher-cifar10"
if [[ ! -f "$teacher/summary.json" ]] && (($(left) > 60)); then
    say "teacher: ResNet-56, cosine + label smoothing, $EPOCHS epochs"
    timeout "$(left)" "$BIN" train --config configs/cifar10/resnet56.toml --device "$DEVICE" \
        --out "$teacher" --no-progress "${sets[@]}" --set "train.epochs=$EPOCHS" \
        --set optim.schedule=cosine --set loss.label_smoothing=0.1 2>>"$log" || true
fi
if [[ -f "$teacher/best.safetensors" ]]; then
    # The study names the teacher by its path from the repository root.
    study studies/paper/table6_refinements_cifar10.toml table6-cifar10 "$EPOCHS"
else
    say "skipped table6-cifar10: no teacher"
fi
if [[ "$DEVICE" == cuda ]] || "$BIN" info | grep -q 'cpu bf16 autocast: true'; then
    study studies/paper/table4_efficient_cifar10.toml table4-cifar10 "$EPOCHS"
else
    say "skipped table4-cifar10: its last row needs bf16, which this CPU lacks"
fi
study studies/paper/table5_tweaks_cifar10.toml table5-cifar10 "$EPOCHS"
study studies/beyond_paper.toml beyond-paper-cifar10 "$EPOCHS"
if [[ -n "${IMAGENETTE_DIR:-}" ]]; then
    sets[1]="data.dir=\"$IMAGENETTE_DIR\""
    study studies/paper/table6_refinements_imagenette.toml table6-imagenette "$IMAGENETTE_EPOCHS"
    study studies/paper/table5_tweaks_imagenette.toml table5-imagenette "$IMAGENETTE_EPOCHS"
    study studies/resnet_vs_seresnext.toml resnet-vs-seresnext "$IMAGENETTE_EPOCHS"
else
    say "skipped the Imagenette studies: IMAGENETTE_DIR is not set"
fi
for t in "$dest"/*/table.md; do
    [[ -f "$t" ]] || continue
    { echo; echo "<!-- $(basename "$(dirname "$t")") -->"; cat "$t"; } >>"$dest/paper-tables.md"
done
say "done in ${SECONDS}s; tables in $dest/paper-tables.md"
