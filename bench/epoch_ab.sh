#!/usr/bin/env bash
# Two builds of tricks against each other on real training epochs, alternating in one run (this VM
# drifts by ±15 % between runs, so only same-run pairs compare): the trainer's whole loop (loader,
# step, metrics, checkpoints), which `bench/ab.sh`'s synthetic step does not exercise.
#   git worktree add /tmp/old <old commit> && (cd /tmp/old && cargo build --release)
#   A=/tmp/old/target/release/tricks B=target/release/tricks bash bench/epoch_ab.sh
# Cases (one epoch each, the training img/s that metrics.jsonl records, evaluation excluded):
#   - classification: CIFAR ResNet-20 on ../shared/data/cifar10, fp32 + channels_last, batch 128,
#     a 6,400-image training subset (50 steps), 1,000 evaluation images;
#   - segmentation: configs/camvid/fcn_resnet18.toml on ../shared/data/camvid-240, 96 training
#     images (12 steps of 8), 24 evaluation images.
# Environment: A, B (binaries), ROUNDS (4), THREADS (2), OUT (bench/out), SHARED (../shared/data).
# Output: one JSON line per run in $OUT/epoch-ab-<date>.jsonl and a table on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
: "${A:?set A to the reference binary}" "${B:=$root/target/release/tricks}"
ROUNDS="${ROUNDS:-4}"
THREADS="${THREADS:-2}"
OUT="${OUT:-$root/bench/out}"
SHARED="${SHARED:-$root/../shared/data}"
mkdir -p "$OUT"
log="$OUT/epoch-ab-$(date +%Y%m%d-%H%M%S).jsonl"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cases=(
    "classification|--config configs/cifar10/resnet20.toml --data $SHARED/cifar10 --set train.channels_last=true --set data.train_limit=6400 --set data.val_limit=1000"
    "segmentation|--config configs/camvid/fcn_resnet18.toml --data $SHARED/camvid-240 --set data.train_limit=96 --set data.val_limit=24"
)

one() { # build binary case-name args round
    local out="$tmp/$1-$3-$5"
    # shellcheck disable=SC2086 # the case is an argument list
    "$2" train $4 --set train.epochs=1 --set train.threads="$THREADS" --no-progress \
        --out "$out" >/dev/null 2>"$out.log" || { cat "$out.log"; exit 1; }
    "$root/.venv/bin/python" - "$1" "$3" "$5" "$out" <<'PYEOF' | tee -a "$log"
import json, sys
build, case, rnd, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
m = [json.loads(l) for l in open(out + "/metrics.jsonl")][-1]
print(json.dumps({"build": build, "case": case, "round": rnd, "img_s": m["images_per_second"],
                  "epoch_s": m["seconds"], "eval_s": m.get("eval_seconds"),
                  "data_wait_s": m.get("data_wait_seconds")}))
PYEOF
}

for round in $(seq "$ROUNDS"); do
    for c in "${cases[@]}"; do
        name="${c%%|*}" args="${c#*|}"
        if ((round % 2)); then
            one A "$A" "$name" "$args" "$round"; one B "$B" "$name" "$args" "$round"
        else
            one B "$B" "$name" "$args" "$round"; one A "$A" "$name" "$args" "$round"
        fi
    done
done

"$root/.venv/bin/python" - "$log" <<'PYEOF'
import json, sys, collections, statistics
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    d = json.loads(line)
    runs[d["case"]].setdefault(d["round"], {})[d["build"]] = d
print("| case | train img/s A | train img/s B | B/A median (per round) | epoch s A | epoch s B |")
print("|---|---:|---:|---|---:|---:|")
for case, by_round in runs.items():
    pairs = [r for r in by_round.values() if "A" in r and "B" in r]
    mean = lambda b, f: sum(r[b][f] for r in pairs) / len(pairs)
    ratios = [r["B"]["img_s"] / r["A"]["img_s"] for r in pairs]
    each = " / ".join("%.2f" % x for x in ratios)
    print(f"| {case} | {mean('A', 'img_s'):.1f} | {mean('B', 'img_s'):.1f} | "
          f"{statistics.median(ratios):.3f} ({each}) | {mean('A', 'epoch_s'):.1f} | {mean('B', 'epoch_s'):.1f} |")
PYEOF
