#!/usr/bin/env bash
# The allocator setting of src/device.rs (keep_freed_memory) against glibc's defaults, same binary,
# alternating: `GLIBC_TUNABLES=glibc.malloc.check=0` names a malloc tunable without changing
# anything, which makes tricks leave glibc's defaults alone. Prints one JSON line per run with
# train/inference img/s (`tricks bench`) and the process's user and system CPU seconds (the page
# faults the setting avoids show up as system time).
#   bench/malloc_ab.sh                      (about 5 minutes on the 2-core VM)
# Environment: ROUNDS (3), THREADS (2), OUT (bench/out).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BIN="${BIN:-$root/target/release/tricks}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
OUT="${OUT:-$root/bench/out}"
mkdir -p "$OUT"
log="$OUT/malloc-ab-$(date +%Y%m%d-%H%M%S).jsonl"
times="$(mktemp)"
trap 'rm -f "$times"' EXIT

one() { # setting, bench args...
    local setting="$1" tun=""
    shift
    [[ "$setting" == glibc-default ]] && tun="glibc.malloc.check=0"
    local line
    line="$(GLIBC_TUNABLES="$tun" /usr/bin/time -f "%U %S" -o "$times" "$BIN" bench "$@" --threads "$THREADS")"
    read -r user sys <"$times"
    "$root/.venv/bin/python" -c 'import json, sys
d = json.loads(sys.argv[1])
print(json.dumps({"allocator": sys.argv[2], "model": d["model"], "variant": d["variant"],
                  "train_img_s": d["train_img_s"], "infer_img_s": d["infer_img_s"],
                  "user_s": float(sys.argv[3]), "sys_s": float(sys.argv[4])}))' \
        "$line" "$setting" "$user" "$sys" | tee -a "$log"
}

for _ in $(seq "$ROUNDS"); do
    for setting in glibc-default tricks; do
        one "$setting" --model cifar_resnet20 --batch 128 --size 32 --precision bf16 --channels-last --steps 100 --warmup 5
    done
    for setting in tricks glibc-default; do
        one "$setting" --model resnet50 --variant d --batch 16 --size 224 --precision bf16 --channels-last --steps 8 --warmup 2
    done
done

"$root/.venv/bin/python" - "$log" <<'PYEOF'
import json, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[(d["model"] + ("-" + d["variant"] if d["variant"] != "a" else ""), d["allocator"])].append(d)
print("| model | allocator | runs | train img/s (each) | mean | infer img/s mean | system CPU s (each) |")
print("|---|---|---:|---|---:|---:|---|")
for (m, a), v in rows.items():
    tr = [d["train_img_s"] for d in v]
    each = " / ".join("%.1f" % x for x in tr)
    sys_s = " / ".join("%.2f" % d["sys_s"] for d in v)
    infer = sum(d["infer_img_s"] for d in v) / len(v)
    print(f"| {m} | {a} | {len(v)} | {each} | {sum(tr) / len(tr):.1f} | {infer:.1f} | {sys_s} |")
PYEOF
echo "raw: $log"
