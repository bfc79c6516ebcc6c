#!/usr/bin/env bash
# Two builds of tricks against each other, alternating in one run (this VM drifts by ±15 % between
# runs, so only same-run pairs compare): `tricks bench` training and inference img/s for each
# model line in CASES, ROUNDS times, A then B in odd rounds and B then A in even ones.
#   cp target/release/tricks /tmp/tricks-a   # before the change
#   cargo build --release                    # after it
#   A=/tmp/tricks-a B=target/release/tricks bash bench/ab.sh
# Environment: A, B (binaries), ROUNDS (3), THREADS (2), OUT (bench/out), CASES (one `tricks
# bench` argument list per line; default: ResNet-50-D 224 px batch 16 and CIFAR ResNet-20 batch
# 128, bf16 + channels_last and fp32).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
: "${A:?set A to the reference binary}" "${B:=$root/target/release/tricks}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
OUT="${OUT:-$root/bench/out}"
CASES="${CASES:-"--model resnet50 --variant d --batch 16 --size 224 --precision bf16 --channels-last --steps 8 --warmup 2
--model resnet50 --variant d --batch 16 --size 224 --precision fp32 --steps 4 --warmup 1
--model cifar_resnet20 --batch 128 --size 32 --precision bf16 --channels-last --steps 60 --warmup 5"}"
mkdir -p "$OUT"
log="$OUT/ab-$(date +%Y%m%d-%H%M%S).jsonl"

one() { # label binary case
    local line
    # shellcheck disable=SC2086 # the case is an argument list
    line="$("$2" bench $3 --threads "$THREADS")"
    "$root/.venv/bin/python" -c 'import json, sys
d = json.loads(sys.argv[1]); d["build"] = sys.argv[2]; d["round"] = int(sys.argv[3])
print(json.dumps(d))' "$line" "$1" "$4" | tee -a "$log"
}

for round in $(seq "$ROUNDS"); do
    while IFS= read -r case; do
        [[ -z "$case" ]] && continue
        if ((round % 2)); then
            one A "$A" "$case" "$round"; one B "$B" "$case" "$round"
        else
            one B "$B" "$case" "$round"; one A "$A" "$case" "$round"
        fi
    done <<<"$CASES"
done

"$root/.venv/bin/python" - "$log" <<'PYEOF'
import json, sys, collections
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    d = json.loads(line)
    key = (d["model"] + ("-" + d["variant"] if d["variant"] != "a" else ""), d["precision"], d["channels_last"])
    runs[key].setdefault(d["round"], {})[d["build"]] = d
print("| model | precision | channels_last | train A | train B | B/A (per round) | infer A | infer B | B/A (per round) |")
print("|---|---|---|---:|---:|---|---:|---:|---|")
for (m, p, cl), by_round in runs.items():
    pairs = [r for r in by_round.values() if "A" in r and "B" in r]
    def cols(field):
        a = sum(r["A"][field] for r in pairs) / len(pairs)
        b = sum(r["B"][field] for r in pairs) / len(pairs)
        each = " / ".join("%.2f" % (r["B"][field] / r["A"][field]) for r in pairs)
        return f"{a:.1f} | {b:.1f} | {b / a:.2f} ({each})"
    print(f"| {m} | {p} | {cl} | {cols('train_img_s')} | {cols('infer_img_s')} |")
PYEOF
echo "raw: $log"
