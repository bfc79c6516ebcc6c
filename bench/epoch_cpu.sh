#!/usr/bin/env bash
# Real epochs on this CPU, each beside its reference measured in the same run:
#   1. Loader cost: img/s of training on ../shared/data/cifar10 (JPEG decode + pad/crop/flip +
#      training) against the same model on a synthetic batch (`tricks bench`, pure compute),
#      and against `data.on_device` (the decoded dataset as one u8 tensor, augmented by tensor ops).
#   2. Data-parallel: the same training with 1 process (global batch B) and with 2 processes
#      over Gloo (`tricks launch --nproc 2`, B/2 each, one thread each).
# Each measurement runs twice, alternating order. The training runs are one epoch of CIFAR
# ResNet-20, batch 128, bf16 + channels_last (the CPU's fastest path); their img/s and the time
# the training loop waited for batches (`data_wait_seconds`, the loader's direct cost) are what
# metrics.jsonl records for the epoch, loading included, evaluation (1,000 images) excluded.
# Output: one JSON line per run in $OUT/epoch-cpu-<date>.jsonl and a table on stdout.
#   bench/epoch_cpu.sh            (about 7 minutes on the 2-core VM)
# Environment: DATA (../shared/data/cifar10), COMPUTE_STEPS (390: as many steps as the epoch, so
# that both run as long; this VM is faster in short bursts), THREADS (2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BIN="${BIN:-$root/target/release/tricks}"
DATA="${DATA:-$root/../shared/data/cifar10}"
THREADS="${THREADS:-2}"
OUT="${OUT:-$root/bench/out}"
mkdir -p "$OUT"
log="$OUT/epoch-cpu-$(date +%Y%m%d-%H%M%S).jsonl"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

common=(--config configs/cifar10/resnet20.toml --data "$DATA" --no-progress
    --set train.precision=bf16 --set train.channels_last=true --set train.epochs=1
    --set data.val_limit=1000)

train_run() { # name, extra args...
    local name="$1"
    shift
    local out="$tmp/$name-$RANDOM"
    local start end
    start=$(date +%s.%N)
    "$@" --out "$out" >/dev/null 2>"$out.log" || { cat "$out.log"; exit 1; }
    end=$(date +%s.%N)
    "$root/.venv/bin/python" - "$name" "$out" "$start" "$end" <<'PYEOF' | tee -a "$log"
import json, sys
name, out, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
m = [json.loads(l) for l in open(out + "/metrics.jsonl")][-1]
print(json.dumps({"run": name, "img_s": m["images_per_second"],
                  "data_wait_s": m.get("data_wait_seconds"), "epoch_s": m["seconds"],
                  "wall_s": end - start}))
PYEOF
}

compute_run() {
    "$BIN" bench --model cifar_resnet20 --batch 128 --size 32 --precision bf16 --channels-last \
        --threads "$THREADS" --steps "${COMPUTE_STEPS:-390}" --warmup 10 |
        "$root/.venv/bin/python" -c 'import json,sys; d=json.loads(sys.stdin.read()); print(json.dumps({"run": "compute (synthetic batch)", "img_s": d["train_img_s"], "optimizer_step_ms": d["optimizer_step_ms"]}))' |
        tee -a "$log"
}

for round in 1 2; do
    compute_run
    train_run "1 process: loader (JPEG decode + augment), batch 128" "$BIN" train "${common[@]}" \
        --set "train.threads=$THREADS"
    train_run "1 process: data.on_device (cpu), batch 128" "$BIN" train "${common[@]}" \
        --set "train.threads=$THREADS" --set data.on_device=true
    train_run "2 processes (Gloo): loader, batch 64 each" "$BIN" launch --nproc 2 -- train \
        "${common[@]}" --set train.batch_size=64
done

"$root/.venv/bin/python" - "$log" <<'PYEOF'
import json, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    d = json.loads(line)
    runs[d["run"]].append(d)
print("| run | img/s (each round) | mean | data wait, s (each round) |")
print("|---|---|---|---|")
for k, v in runs.items():
    ips = [d["img_s"] for d in v]
    wait = " / ".join(f"{d['data_wait_s']:.2f}" for d in v if d.get("data_wait_s") is not None) or "-"
    print(f"| {k} | {' / '.join(f'{x:.0f}' for x in ips)} | {sum(ips) / len(ips):.0f} | {wait} |")
PYEOF
echo "raw: $log"
