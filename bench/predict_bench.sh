#!/usr/bin/env bash
# `tricks predict` against its PyTorch reference (bench/predict_ref.py: a DataLoader with PIL and
# torchvision's transforms feeding the same network, exported by `tricks export`), on the same
# image folder in the same call, alternating ROUNDS times; then how often the two agree on the
# top-1 class. One line per run and a summary on stdout.
#
#   bench/predict_bench.sh CHECKPOINT FOLDER [ROUNDS]
#
# Environment: BIN (default target/release/tricks), PY (.venv/bin/python), THREADS (libtorch
# threads of both, default 2), WORKERS (DataLoader workers of the reference, default 2), BATCH (64).
# `tricks predict`'s time is the whole command (start, model load, decode, forward, CSV); the
# reference's excludes Python's start and the model load.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$root/target/release/tricks}"
PY="${PY:-$root/.venv/bin/python}"
THREADS="${THREADS:-2}" WORKERS="${WORKERS:-2}" BATCH="${BATCH:-64}"
ckpt="$1" folder="$2" rounds="${3:-2}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$BIN" export --checkpoint "$ckpt" --out "$tmp/model.pt" >/dev/null
n=$(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l)
echo "checkpoint $ckpt, $n images under $folder, batch $BATCH, $THREADS threads, $(nproc) cores, $(date -u +%FT%TZ), commit $(git -C "$root" rev-parse --short HEAD)"
t_sum=0 r_sum=0
for r in $(seq 1 "$rounds"); do
    t0=$(date +%s.%N)
    "$BIN" predict --checkpoint "$ckpt" --image "$folder" --csv "$tmp/tricks.csv" --no-progress \
        --batch-size "$BATCH" --threads "$THREADS" >/dev/null
    t=$(echo "$(date +%s.%N) - $t0" | bc -l)
    ref=$("$PY" "$root/bench/predict_ref.py" --module "$tmp/model.pt" --folder "$folder" \
        --csv "$tmp/ref.csv" --batch "$BATCH" --workers "$WORKERS" --threads "$THREADS")
    rs=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$ref")
    printf 'round %d: tricks predict %.1f s (%.0f img/s), PyTorch reference %.1f s (%.0f img/s)\n' \
        "$r" "$t" "$(echo "$n / $t" | bc -l)" "$rs" "$(echo "$n / $rs" | bc -l)"
    t_sum=$(echo "$t_sum + $t" | bc -l) r_sum=$(echo "$r_sum + $rs" | bc -l)
done
"$PY" - "$tmp/tricks.csv" "$tmp/ref.csv" <<'EOF'
import csv, sys
def top1(path):
    with open(path) as f:
        return {row["path"]: (row["class_1"], float(row["probability_1"])) for row in csv.DictReader(f)}
a, b = top1(sys.argv[1]), top1(sys.argv[2])
common = sorted(set(a) & set(b))
same = sum(a[p][0] == b[p][0] for p in common)
dp = max(abs(a[p][1] - b[p][1]) for p in common)
print(f"top-1 agreement: {same} of {len(common)} images ({100 * same / len(common):.2f} %), "
      f"largest top-1 probability difference {dp:.4f} (resizing differs slightly: ours vs PIL)")
EOF
printf 'mean: tricks predict %.0f img/s, PyTorch reference %.0f img/s, ratio %.2f\n' \
    "$(echo "$n * $rounds / $t_sum" | bc -l)" "$(echo "$n * $rounds / $r_sum" | bc -l)" \
    "$(echo "$r_sum / $t_sum" | bc -l)"
