#!/usr/bin/env bash
# CPU training speed on a quiet machine and beside one competing busy process, by intra-op thread
# count and OpenMP wait policy, for `tricks bench` and the PyTorch reference (bench/pytorch_bench.py)
# in the same run. libtorch's OpenMP runtime (the libgomp PyTorch ships) reads OMP_WAIT_POLICY and
# GOMP_SPINCOUNT once, when it is loaded, so each setting is a fresh process.
#   bench/cpu_contention.sh            (about 10 minutes on the 2-core VM)
# Settings compared: libgomp's default (spin up to 300,000 iterations before sleeping, 1,000 when
# there are more threads than CPUs), OMP_WAIT_POLICY=PASSIVE (sleep at once), GOMP_SPINCOUNT=N.
# The competitor is a shell busy loop (one core's worth of work, not niced). Rounds alternate the
# settings so that drifting neighbours spread over all of them; the summary is the median per cell.
# Environment: ROUNDS (3), MODEL (cifar_resnet20), STEPS (10), SPINS ("10000"), OUT (bench/out),
# BIN (target/release/tricks).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BIN="${BIN:-$root/target/release/tricks}"
PY="$root/.venv/bin/python"
ROUNDS="${ROUNDS:-3}"
MODEL="${MODEL:-cifar_resnet20}"
STEPS="${STEPS:-10}"
SPINS="${SPINS:-10000}"
OUT="${OUT:-$root/bench/out}"
mkdir -p "$OUT"
log="$OUT/cpu-contention-$(date +%Y%m%d-%H%M%S).jsonl"
busy_pid=""
trap '[[ -n "$busy_pid" ]] && kill "$busy_pid" 2>/dev/null; true' EXIT

settings=(default passive)
for s in $SPINS; do settings+=("spin$s"); done

policy_env() { # setting -> env assignments
    case "$1" in
    default) echo "TRICKS_BENCH_POLICY=default" ;;
    passive) echo "OMP_WAIT_POLICY=PASSIVE" ;;
    spin*) echo "GOMP_SPINCOUNT=${1#spin}" ;;
    esac
}

one() { # load impl setting threads
    local load="$1" impl="$2" setting="$3" threads="$4" line
    local -a envs
    read -r -a envs <<<"$(policy_env "$setting")"
    if [[ "$impl" == tricks ]]; then
        line="$(env "${envs[@]}" "$BIN" bench --model "$MODEL" --channels-last --steps "$STEPS" \
            --warmup 2 --threads "$threads")"
    else
        line="$(env "${envs[@]}" "$PY" bench/pytorch_bench.py --model "$MODEL" --channels-last \
            --steps "$STEPS" --warmup 2 --threads "$threads" | tail -1)"
    fi
    "$PY" -c 'import json, sys
d = json.loads(sys.argv[1])
print(json.dumps({"load": sys.argv[2], "impl": sys.argv[3], "setting": sys.argv[4],
                  "threads": int(sys.argv[5]), "threads_used": d.get("threads"), "model": d["model"],
                  "train_img_s": d["train_img_s"], "infer_img_s": d["infer_img_s"],
                  "loadavg": open("/proc/loadavg").read().split()[0]}))' \
        "$line" "$load" "$impl" "$setting" "$threads" | tee -a "$log"
}

for round in $(seq "$ROUNDS"); do
    for load in quiet busy; do
        if [[ "$load" == busy ]]; then
            sh -c 'while :; do :; done' &
            busy_pid=$!
            sleep 1
        fi
        # tricks with --threads 0: the count that follows the free cores (device::IntraOpThreads).
        one "$load" tricks default 0
        for threads in 1 2; do
            for setting in "${settings[@]}"; do
                one "$load" tricks "$setting" "$threads"
            done
            # PyTorch: its default and the best-known alternative.
            one "$load" pytorch default "$threads"
            one "$load" pytorch passive "$threads"
        done
        if [[ -n "$busy_pid" ]]; then
            kill "$busy_pid"
            wait "$busy_pid" 2>/dev/null || true
            busy_pid=""
        fi
    done
    echo "round $round of $ROUNDS done" >&2
done

"$PY" - "$log" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cells = {}
for r in rows:
    cells.setdefault((r["load"], r["impl"], r["setting"], r["threads"]), []).append(r["train_img_s"])
print(f"\n{rows[0]['model']}, fp32 + channels_last, train img/s, median of {len(next(iter(cells.values())))} (log: {sys.argv[1]})")
print(f"{'load':6} {'impl':8} {'setting':10} {'1 thread':>9} {'2 threads':>10} {'auto (0)':>9}")
for (load, impl, setting) in dict.fromkeys((k[0], k[1], k[2]) for k in cells):
    med = lambda t: statistics.median(cells[(load, impl, setting, t)]) if (load, impl, setting, t) in cells else float("nan")
    print(f"{load:6} {impl:8} {setting:10} {med(1):9.0f} {med(2):10.0f} {med(0):9.0f}")
EOF
