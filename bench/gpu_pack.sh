#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on the device machine into one carried folder, data-local/gpu/,
# small enough to travel with the working tree in one call (64 MiB in all):
#   tricks.xz   the release binary, xz-compressed (~3 MB instead of ~10.5 MB)
#   cifar10.tar.gz  ../shared/data/cifar10 (ImageFolder JPEGs, 58 MB in 60,000 files) as one
#               gzipped tar (20 MB: the small JPEGs are mostly identical headers), for the
#               time-to-accuracy runs. The device tool counts the folder's size on disk, where
#               60,000 files of 1 KB take 4 KB blocks each (239 MB): loose files do not fit.
#   imagenette.tar.gz  the first PER_CLASS (256) training and PER_CLASS/10 validation JPEGs of each
#               class of ../shared/data/imagenette2-160 (15 MB), which bench/gpu_loader.sh turns
#               into ImageNet-size JPEGs on the device (PER_CLASS=0 leaves them out)
#   tricks-base.xz  (when BASE_BIN names an earlier build) the base of bench/gpu_ab.sh's A/B runs
#   airbench/   the `airbench` package (airbench==0.1.8 from PyPI, MIT; 12 KB), the same-run
#               reference of the time-to-accuracy runs (bench/airbench_ref.py); skipped with a
#               warning when PyPI cannot be reached.
# Then, on a session with a device:
#   bash bench/gpu_pack.sh
#   run(command="bash bench/gpu.sh", carry=["data-local/gpu"], timeout_s=480)
# gpu.sh finds both there by itself (BIN and CIFAR10_DIR override), as do bench/paper_tables.sh
# and bench/gpu_loader.sh (the Imagenette subset; IMAGENETTE_DIR overrides).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BIN="${BIN:-$root/target/release/tricks}"
DATA="${DATA:-$root/../shared/data/cifar10}"
dest="$root/data-local/gpu"
[[ -x "$BIN" ]] || { echo "no binary at $BIN: run cargo build --release first" >&2; exit 1; }
[[ -d "$DATA/train" && -d "$DATA/test" ]] || { echo "$DATA: expected train/ and test/ folders" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
xz -T0 -6 -c "$BIN" >"$dest/tricks.xz"
if [[ -n "${BASE_BIN:-}" ]]; then
    [[ -x "$BASE_BIN" ]] || { echo "BASE_BIN=$BASE_BIN is not an executable" >&2; exit 1; }
    xz -T0 -6 -c "$BASE_BIN" >"$dest/tricks-base.xz"
fi
tar -C "$(dirname "$DATA")" -cf - "$(basename "$DATA")" | gzip -6 >"$dest/cifar10.tar.gz"
IMAGENETTE="${IMAGENETTE:-$root/../shared/data/imagenette2-160}"
PER_CLASS="${PER_CLASS:-256}"
if ((PER_CLASS > 0)) && [[ -d "$IMAGENETTE/train" && -d "$IMAGENETTE/val" ]]; then
    name="$(basename "$IMAGENETTE")"
    for split in train val; do
        count=$PER_CLASS
        [[ "$split" == val ]] && count=$(((PER_CLASS + 9) / 10))
        for cls in "$IMAGENETTE/$split"/*/; do
            # awk, not head: head's early exit would fail the pipe (pipefail) on a large class.
            find "$cls" -maxdepth 1 -type f -printf '%f\n' | sort |
                awk -v n="$count" -v p="$name/$split/$(basename "$cls")/" 'NR <= n { print p $0 }'
        done
    done >"$dest/imagenette.list"
    tar -C "$(dirname "$IMAGENETTE")" -cf - -T "$dest/imagenette.list" | gzip -6 >"$dest/imagenette.tar.gz"
    rm "$dest/imagenette.list"
else
    echo "note: no Imagenette subset packed (PER_CLASS=$PER_CLASS, $IMAGENETTE): gpu_loader.sh needs it" >&2
fi
PY="${PY:-$root/.venv/bin/python}"
sdist="$(mktemp -d)"
if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$sdist" airbench==0.1.8 >&2; then
    tar -C "$sdist" -xzf "$sdist"/airbench-0.1.8.tar.gz
    cp -r "$sdist/airbench-0.1.8/airbench" "$dest/airbench"
else
    echo "warning: could not download airbench from PyPI: gpu.sh will skip its reference runs" >&2
fi
rm -rf "$sdist"
# Bytes on disk (allocated blocks), as the device tool counts them.
bytes() { du -s --block-size=1 "$@" | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | du -s --block-size=1 --files0-from=- | awk '{s += $1} END {print s + 0}')
total=$(( $(bytes "$dest") + tree ))
limit=$(( 64 * 1024 * 1024 ))
printf 'data-local/gpu: %d bytes; working tree: %d bytes; together %d of %d\n' \
    "$(bytes "$dest")" "$tree" "$total" "$limit"
if (( total > limit )); then
    echo "over the 64 MiB a device call carries" >&2
    exit 1
fi
