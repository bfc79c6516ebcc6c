#!/usr/bin/env bash
# Time to accuracy of two tricks binaries on the lent GPU, taking turns run by run in one call (the
# card's speed differs from call to call: H200 instances here took 1.9 s and 2.7 s for the same
# airbench94 run), beside airbench94 in the same call. Here:
#   cargo build --release   (the candidate)
#   BASE_BIN=<an earlier build of tricks> bash bench/gpu_pack.sh
# then on the device:
#   run(command="bash bench/gpu_ab.sh", carry=["data-local/gpu"], timeout_s=300)
# Each run is one bench/gpu.sh time-to-accuracy entry, "$CONFIG:seed=S$SETS", with the candidate
# (tricks.xz) and the base (tricks-base.xz); the order swaps every seed. It prints one JSON line
# per run, prefixed by "new" or "base", then airbench94's runs (AIRBENCH_RUNS, 5 by default).
# On the H200, 12 runs of the airbench94 recipe and 5 of airbench94 took 230 s (6-7 s a run was
# the training process; the rest gpu.sh's start-up, whose device checks now run once per call).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pack="$root/data-local/gpu"
PY="${PY:-/opt/torch/.venv/bin/python3}"
[[ -x "$PY" ]] || PY="$root/.venv/bin/python"
OUT="${OUT:-$root/bench/out}"
CONFIG="${CONFIG:-airbench94}"
# Evaluated once, at the end, as airbench times itself.
SETS="${SETS:-,train.eval_every=100}"
SEEDS="${SEEDS:-0 1 2 3 4 5}"
for f in tricks.xz tricks-base.xz cifar10.tar.gz; do
    [[ -f "$pack/$f" ]] || { echo "$pack/$f missing: run BASE_BIN=... bash bench/gpu_pack.sh" >&2; exit 1; }
done
bins="$(mktemp -d)"
for b in new base; do
    src="$pack/tricks.xz"
    [[ "$b" == base ]] && src="$pack/tricks-base.xz"
    "$PY" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$src" "$bins/$b"
    chmod +x "$bins/$b"
done
data="$(mktemp -d)"
tar -C "$data" -xzf "$pack/cifar10.tar.gz"
TORCH_SITE="$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
export CIFAR10_DIR="$data/cifar10" SPEED=0 AB_SPEED=0 OPTIONAL=0 PY TORCH_SITE
one() { # binary seed airbench-runs
    AIRBENCH_RUNS="$3" TTA_CONFIGS="$CONFIG:seed=$2$SETS" BIN="$bins/$1" OUT="$OUT/$1" \
        bash bench/gpu.sh 2>&1 | grep -E '^\{"time_to|^airbench94 run' | sed "s/^{/$1 {/"
    # gpu.sh's device checks (both builds start the same way) once per call, not per run.
    export CHECKED=1
}
first=new second=base
for s in $SEEDS; do
    one "$first" "$s" 0
    one "$second" "$s" 0
    tmp="$first" first="$second" second="$tmp"
done
# The reference, on the same card in the same call (gpu.sh's step 3a), with one more candidate run.
one new 99 "${AIRBENCH_RUNS:-5}"
