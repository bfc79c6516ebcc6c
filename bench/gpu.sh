#!/usr/bin/env bash
# GPU benchmark for the lent device machine (CUDA 13, PyTorch 2.11 in /opt/torch/.venv, no Rust,
# no network). Build here, then run there with the binary carried:
#   cargo build --release
#   run(command="bash bench/gpu.sh", carry=["target/release/tricks"], timeout_s=540)
# It finishes in well under 8 minutes and prints one JSON line per measurement plus a summary
# table; figures go to $OUT (the device tool brings them back) and belong in BENCHMARKS.md.
#   1. ResNet-50 (ResNet-B layout) bf16 autocast + channels_last, 224 px, batch 256: training and
#      inference img/s of tricks beside PyTorch eager AMP in the same call.
#   2. CIFAR ResNet-20, batch 512, fp32 and bf16 + channels_last, beside PyTorch.
#   3. (when CIFAR10_DIR points at the carried ../shared/data/cifar10 JPEG folder, 57 MB)
#      time to 90.5 % top-1 on its test split: configs/cifar10/resnet20-efficient.toml on cuda.
#   4. Data-parallel training through NCCL with world size 1 (`tricks launch --nproc 1`), on a
#      small random CIFAR-format dataset written here, beside the same run in one process.
# Smoke check of the same script on a CPU:
#   DEVICE=cpu STEPS=1 WARMUP=1 R50_BATCH=2 CIFAR_BATCH=16 PY=.venv/bin/python bash bench/gpu.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PY:-/opt/torch/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$root/.venv/bin/python"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-10}"
BIN="${BIN:-$root/target/release/tricks}"
OUT="${OUT:-$root/bench/out}"
mkdir -p "$OUT"
site="$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
ld="$site/torch/lib"
for d in "$site"/nvidia/*/lib; do [[ -d "$d" ]] && ld="$ld:$d"; done
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log="$OUT/gpu-$(date +%Y%m%d-%H%M%S).jsonl"

"$BIN" info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee -a "$OUT/info.txt" || true

pair() { # model variant batch size precision channels_last(0/1)
    local cl=() pcl=()
    [[ "$6" == 1 ]] && cl=(--channels-last) && pcl=(--channels-last)
    "$BIN" bench --model "$1" --variant "$2" --batch "$3" --size "$4" --precision "$5" "${cl[@]}" \
        --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" | tee -a "$log"
    "$PY" bench/pytorch_bench.py --model "$1" \
        --batch "$3" --size "$4" --precision "$5" "${pcl[@]}" --device "$DEVICE" \
        --steps "$STEPS" --warmup "$WARMUP" | tail -n 1 | tee -a "$log"
}

pair resnet50 b "${R50_BATCH:-256}" 224 bf16 1
pair cifar_resnet20 a "${CIFAR_BATCH:-512}" 32 fp32 0
pair cifar_resnet20 a "${CIFAR_BATCH:-512}" 32 bf16 1

if [[ -n "${CIFAR10_DIR:-}" && -d "$CIFAR10_DIR/train" ]]; then
    start=$(date +%s.%N)
    "$BIN" train --config configs/cifar10/resnet20-efficient.toml --data "$CIFAR10_DIR" \
        --out "$OUT/tta" --device "$DEVICE" --no-progress --set data.on_device=true 2>&1 | tail -n 5
    end=$(date +%s.%N)
    echo "{\"time_to_accuracy_run_s\": $(echo "$end - $start" | bc)}" | tee -a "$log"
    cat "$OUT/tta/metrics.jsonl" >> "$log"
else
    echo "time-to-accuracy: skipped (set CIFAR10_DIR to the carried CIFAR-10 JPEG folder)"
fi

# 4. NCCL, world size 1: the c10d path (TCP store, ProcessGroupNCCL, DDP's Reducer) on the GPU.
if [[ "$DEVICE" == cuda ]]; then
    synth="$OUT/synth-cifar"
    "$PY" - "$synth" <<'PYEOF'
import os, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
for name, n in [("data_batch_1.bin", 2048), ("test_batch.bin", 512)]:
    with open(os.path.join(d, name), "wb") as f:
        for i in range(n):
            f.write(bytes([i % 10]) + os.urandom(3072))
PYEOF
    for mode in single nccl; do
        cmd=(train --config configs/cifar10/resnet20.toml --data "$synth" --device cuda --no-progress
            --out "$OUT/dp-$mode" --set train.epochs=2 --set 'optim.step_epochs=[1]'
            --set train.precision=bf16 --set train.channels_last=true)
        start=$(date +%s.%N)
        if [[ "$mode" == nccl ]]; then
            "$BIN" launch --nproc 1 -- "${cmd[@]}" 2>&1 | tail -n 3
        else
            "$BIN" "${cmd[@]}" 2>&1 | tail -n 2
        fi
        end=$(date +%s.%N)
        echo "{\"data_parallel\": \"$mode\", \"seconds\": $(echo "$end - $start" | bc), \"last_epoch\": $(tail -n 1 "$OUT/dp-$mode/metrics.jsonl" 2>/dev/null || echo null)}" | tee -a "$log"
    done
fi

"$PY" - "$log" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"impl"' in l]
print("| model | precision | channels_last | tricks train | pytorch train | ratio | tricks infer | pytorch infer | ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for t, p in zip(rows[0::2], rows[1::2]):
    print(f"| {t['model']} | {t['precision']} | {t['channels_last']} | {t['train_img_s']:.0f} | {p['train_img_s']:.0f} | "
          f"{t['train_img_s'] / p['train_img_s']:.2f} | {t['infer_img_s']:.0f} | {p['infer_img_s']:.0f} | "
          f"{t['infer_img_s'] / p['infer_img_s']:.2f} |")
PYEOF
