#!/usr/bin/env bash
# What one core decodes and augments of ImageNet-size JPEGs, tricks' loader against torchvision's
# (issue 27, item 2: will WORKERS cores keep a GPU's ResNet-50 fed?). Both run pinned to core CORE
# (default 0) of this machine, one after the other:
#   1. ImageNet-size JPEGs (shorter side 375, quality 90) made from the first PER_CLASS (200)
#      training images of each class of ../shared/data/imagenette2-160 (bench/imagenet_size.py);
#   2. torchvision's ImageFolder (PIL) through three pipelines: decode only, its reference preset,
#      the paper's (bench/torchvision_loader.py);
#   3. tricks' data::Loader with the "imagenet" pipeline at 224 px (RandomResizedCrop, flip, colour
#      jitter, PCA lighting, normalise) with one worker, uncached and cached (the cached pass is
#      the transform alone; the cache's decode time is decoding alone), from tests/data_throughput.rs.
#   bash bench/loader_per_core.sh            # CORE=1 to pin elsewhere, ROUNDS=2 to repeat 2-3
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
CORE="${CORE:-0}"
PER_CLASS="${PER_CLASS:-200}"
ROUNDS="${ROUNDS:-1}"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
python bench/imagenet_size.py ../shared/data/imagenette2-160 "$data/imagenette2-160" \
    --train "$PER_CLASS" --val 1
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), pinned to core $CORE; $(date -u +%F)"
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    taskset -c "$CORE" python bench/torchvision_loader.py "$data/imagenette2-160"
    TRICKS_BENCH_DATA="$data" TRICKS_BENCH_WORKERS=1 taskset -c "$CORE" \
        cargo test --release -q --test data_throughput loader_throughput -- --ignored --nocapture 2>&1 |
        grep 'img/s'
done
