#!/usr/bin/env bash
# Does the loader keep a GPU fed from ImageNet-size JPEGs? (issue 27, item 2). On the lent GPU
# machine's cores: ResNet-50 (torchvision's layout, ResNet-B), bf16 autocast + channels_last,
# batch 256, 224 px, the paper's ImageNet training augmentation, trained from JPEGs of about
# 500x375 by `tricks train` with data.workers = WORKERS, against the same model's synthetic-batch
# speed (`tricks bench`); and, in the same call, PyTorch eager fed by torchvision's ImageFolder +
# DataLoader(num_workers=WORKERS, pin_memory=True) against its own synthetic batch
# (bench/pytorch_bench.py --data). The goal: tricks' real epochs at >= 0.95x its synthetic step.
#
# The JPEGs: the carried Imagenette subset (bench/gpu_pack.sh packs PER_CLASS = 256 training and
# 26 validation images of each class at 160 px, 15 MB) upscaled there to a shorter side of 375 px
# at quality 90 (bench/imagenet_size.py, all cores, seconds); upscaled photos compress better than
# real ones (about 28 KB against ImageNet's ~110 KB), so decoding them is cheaper than ImageNet's.
#   cargo build --release && bash bench/gpu_pack.sh
#   run(command="bash bench/gpu_loader.sh", carry=["data-local/gpu"], timeout_s=300)
# tricks trains EPOCHS (6) epochs of the 2,560 images (10 steps each, evaluated once at the end
# on the 260 validation images); its figure is the median images_per_second of epochs 2..EPOCHS,
# with the seconds its loop waited for batches. PyTorch runs WARMUP (10) untimed then STEPS (30)
# timed steps on each side.
# Smoke check on a CPU (tiny sizes; the figures mean nothing there):
#   DEVICE=cpu BATCH=8 EPOCHS=2 STEPS=2 WARMUP=1 WORKERS=2 PER_CLASS=4 bash bench/gpu_loader.sh
# Environment: BIN, IMAGENETTE_DIR (the 160-px ImageFolder; default: the pack's, else
# ../shared/data/imagenette2-160), DEVICE, BATCH, EPOCHS, STEPS, WARMUP, WORKERS (default: the
# cores), PER_CLASS, OUT, PY.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=bench/gpu_env.sh
source "$root/bench/gpu_env.sh"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-256}"
EPOCHS="${EPOCHS:-6}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-10}"
WORKERS="${WORKERS:-$(nproc)}"
PER_CLASS="${PER_CLASS:-256}"
OUT="${OUT:-$root/bench/out}"
mkdir -p "$OUT"
IMAGENETTE_DIR="${IMAGENETTE_DIR:-$(unpack imagenette "$root/../shared/data/imagenette2-160")}"
if [[ "$DEVICE" == cuda ]]; then
    link_torch
    "$BIN" info | grep -q 'cuda: yes' || { echo "tricks sees no CUDA device" >&2; exit 3; }
fi
log="$OUT/gpu-loader-$(date +%Y%m%d-%H%M%S).jsonl"

data="$(mktemp -d)/imagenet-size"
"$PY" bench/imagenet_size.py "$IMAGENETTE_DIR" "$data" --train "$PER_CLASS" \
    --val $(((PER_CLASS + 9) / 10)) | tee -a "$OUT/gpu-loader.txt"

model=(--model resnet50 --batch "$BATCH" --size 224 --precision bf16 --channels-last --device "$DEVICE")
"$BIN" bench "${model[@]}" --variant b --steps "$STEPS" --warmup "$WARMUP" | tee -a "$log"
"$PY" bench/pytorch_bench.py "${model[@]}" --steps "$STEPS" --warmup "$WARMUP" | tail -n 1 | tee -a "$log"
"$PY" bench/pytorch_bench.py "${model[@]}" --steps "$STEPS" --warmup "$WARMUP" \
    --data "$data" --workers "$WORKERS" | tail -n 1 | tee -a "$log"

run="$OUT/loader-resnet50"
rm -rf "$run"
"$BIN" train --config configs/imagenet/resnet50d-imagenette.toml --data "$data" --out "$run" \
    --device "$DEVICE" --no-progress --set model.variant=b --set train.epochs="$EPOCHS" \
    --set train.batch_size="$BATCH" --set train.precision=bf16 --set train.channels_last=true \
    --set data.train_size=224 --set data.val_size=224 --set data.val_crop_ratio=0.875 \
    --set data.workers="$WORKERS" --set train.eval_every=1000 --set optim.warmup_epochs=0 \
    --set train.keep_checkpoints=1 2>&1 | tail -n 3
find "$run" -name '*.safetensors' -size +256k -delete 2>/dev/null || true

"$PY" - "$log" "$run/metrics.jsonl" "$WORKERS" <<'PYEOF' | tee "$OUT/gpu-loader.md"
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
epochs = [json.loads(l) for l in open(sys.argv[2])]
workers = sys.argv[3]
synthetic = {r["impl"]: r["train_img_s"] for r in lines if not r.get("data")}
torch_real = next((r["train_img_s"] for r in lines if r.get("data")), None)
warm = epochs[1:] or epochs
tricks_real = statistics.median(m["images_per_second"] for m in warm)
wait = [round(m["data_wait_seconds"], 2) for m in warm]
secs = [round(m["seconds"], 2) for m in warm]
print(json.dumps({"loader_resnet50": {"tricks_synthetic": synthetic.get("tricks"), "tricks_jpeg": round(tricks_real, 1),
                  "tricks_data_wait_s": wait, "tricks_epoch_s": secs, "pytorch_synthetic": synthetic.get("pytorch"),
                  "pytorch_jpeg": torch_real, "workers": int(workers)}}))
print(f"| | synthetic batch (img/s) | from JPEGs, {workers} workers (img/s) | JPEGs / synthetic |")
print("|---|--:|--:|--:|")
for name, s, r in (("tricks", synthetic.get("tricks"), tricks_real), ("PyTorch + DataLoader", synthetic.get("pytorch"), torch_real)):
    print(f"| {name} | {s:.0f} | {r:.0f} | {r / s:.2f} |" if s and r else f"| {name} | {s} | {r} | - |")
print(f"tricks' loop waited {wait} s for batches in epochs 2..{len(epochs)} ({secs} s each)")
PYEOF
