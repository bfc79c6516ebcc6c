#!/usr/bin/env bash
# Speed of `tricks bench` against the PyTorch reference (bench/pytorch_bench.py).
#
# For each model and each configuration (fp32; bf16 + channels_last) it runs the Rust binary
# and the PyTorch script one after the other, alternating which goes first, each on the same
# synthetic batch with the same optimizer (SGD nesterov, momentum 0.9, wd 1e-4), then prints a
# Markdown table with train/inference img/s of both and the ratio tricks/pytorch.
# Raw JSON lines go to bench/out/bench-<date>.jsonl, the table to bench/out/bench-<date>.md.
#
# How long: (WARMUP + STEPS) training steps plus as many inference steps per run, 4 runs per
# model (2 configs x 2 implementations). On 2 shared CPU cores one fp32 training step takes
# ~3 s for cifar_resnet20 (batch 128) and ~12 s for resnet50d (batch 16), so the defaults
# (STEPS=10, WARMUP=3) take about 30-40 min in all (cifar_resnet20 ~3 min, cifar_resnet56
# ~10 min, resnet50d ~20 min); on a 16-core machine a few minutes. Quick look (~1.5 min here):
#   STEPS=3 WARMUP=1 MODELS=cifar_resnet20 bench/run.sh
#
# Environment:
#   STEPS=10      timed steps per measurement        WARMUP=3   untimed steps before
#   DEVICE=cpu    cpu | cuda (on the lent GPU machine: batches of 256 / 512, and the set-up of
#                 bench/gpu_env.sh)                  MODELS="cifar_resnet20 cifar_resnet56 resnet50d"
#                 (also: airbench94, batch 1024, the network of configs/cifar10/airbench94.toml,
#                 ~4 s per fp32 step here; resnext50_32x4d, seresnet50, seresnext50_32x4d at
#                 224 px batch 16, PyTorch's side built by timm)
#   CONFIGS="fp32 bf16-cl"   fp32 = fp32 NCHW; bf16-cl = bf16 autocast + channels_last
#   THREADS=      intra-op threads, passed as --threads to both sides (default: PyTorch's own
#                 default, torch.get_num_threads(), so that both use the same number)
#   TRICKS_BIN=target/release/tricks   PYTHON=.venv/bin/python   BUILD=1 runs cargo build --release first
#   ROUNDS=1      repeat the whole alternation; the table gives means and the per-round ratio range
#   COMPILE=      a torch.compile mode (default, max-autotune, ...): PyTorch compiled by Inductor
#                 runs too, after the eager reference (its compile time is not in its img/s), and
#                 the table gets its columns and tricks' ratio against it
#   PYTORCH_GLIBC_TUNABLES=   GLIBC_TUNABLES for the PyTorch runs only, e.g. the allocator settings
#                 tricks makes itself (src/device.rs): glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-3}"
DEVICE="${DEVICE:-cpu}"
MODELS="${MODELS:-cifar_resnet20 cifar_resnet56 resnet50d}"
CONFIGS="${CONFIGS:-fp32 bf16-cl}"
if [[ "$DEVICE" == cuda ]]; then
    # On the lent GPU machine: the packed binary, /opt/torch's Python and its libtorch, as the
    # other device scripts (bench/gpu_env.sh), e.g. for issue 27's compiled reference:
    #   run(command="COMPILE=max-autotune DEVICE=cuda MODELS='resnet50d cifar_resnet20 airbench94' \
    #       CONFIGS=bf16-cl bash bench/run.sh", carry=["data-local/gpu"])
    # shellcheck source=bench/gpu_env.sh
    source "$root/bench/gpu_env.sh"
    link_torch
    TRICKS_BIN="${TRICKS_BIN:-$BIN}"
    PYTHON="${PYTHON:-$PY}"
fi
TRICKS_BIN="${TRICKS_BIN:-$root/target/release/tricks}"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
ROUNDS="${ROUNDS:-1}"
PYTORCH_GLIBC_TUNABLES="${PYTORCH_GLIBC_TUNABLES:-}"
COMPILE="${COMPILE:-}"

if [[ "${BUILD:-0}" == 1 ]]; then
    cargo build --release --bin tricks
fi
if [[ ! -x "$TRICKS_BIN" ]]; then
    echo "run.sh: no $TRICKS_BIN (cargo build --release, or BUILD=1)" >&2
    exit 1
fi
if [[ ! -x "$PYTHON" ]]; then
    echo "run.sh: no $PYTHON (scripts/setup.sh --with-timm)" >&2
    exit 1
fi

if [[ -z "${THREADS:-}" ]]; then
    THREADS="$("$PYTHON" -c 'import torch; print(torch.get_num_threads())')"
fi
echo "threads: $THREADS, steps: $STEPS, warmup: $WARMUP, device: $DEVICE, rounds: $ROUNDS, pytorch GLIBC_TUNABLES: ${PYTORCH_GLIBC_TUNABLES:-none}" >&2

mkdir -p bench/out
stamp="$(date +%Y%m%d-%H%M%S)"
jsonl="bench/out/bench-$stamp.jsonl"
table="bench/out/bench-$stamp.md"
: >"$jsonl"

# Batch sizes for a small CPU; on a GPU those of bench/gpu.sh (ResNet-50 256, CIFAR ResNets 512).
batch_of() {
    case "$1" in
    resnet50d | resnext50_32x4d | seresnet50 | seresnext50_32x4d) [[ "$DEVICE" == cuda ]] && echo 256 || echo 16 ;;
    airbench94) echo 1024 ;;
    *) [[ "$DEVICE" == cuda ]] && echo 512 || echo 128 ;;
    esac
}
size_of() { case "$1" in resnet50d | resnext50_32x4d | seresnet50 | seresnext50_32x4d) echo 224 ;; *) echo 32 ;; esac; }
# The Rust CLI names an architecture by depth + paper variant: resnet50d = resnet50, variant d.
# (Basic-block CIFAR ResNets are the same in every variant; "a" is the paper's baseline.)
tricks_model_of() { case "$1" in resnet50d) echo "--model resnet50 --variant d" ;; *) echo "--model $1 --variant a" ;; esac; }

# run_one IMPL MODEL CONFIG: appends the JSON line(s) of one run to $jsonl.
run_one() {
    local impl="$1" model="$2" config="$3" precision cl=() compile=()
    [[ "$impl" == pytorch-compiled ]] && compile=(--compile "$COMPILE")
    case "$config" in
        fp32) precision=fp32 ;;
        bf16-cl) precision=bf16 cl=(--channels-last) ;;
        fp32-cl) precision=fp32 cl=(--channels-last) ;;
        bf16) precision=bf16 ;;
        *) echo "run.sh: unknown config $config" >&2; exit 2 ;;
    esac
    local common=(--batch "$(batch_of "$model")" --size "$(size_of "$model")" --precision "$precision"
        ${cl[@]+"${cl[@]}"} --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS")
    local out tm
    echo "[$(date +%T)] $impl $model $config" >&2
    if [[ "$impl" == tricks ]]; then
        read -r -a tm <<<"$(tricks_model_of "$model")"
        out="$("$TRICKS_BIN" bench "${tm[@]}" "${common[@]}")"
    else
        if [[ -n "$PYTORCH_GLIBC_TUNABLES" ]]; then
            out="$(GLIBC_TUNABLES="$PYTORCH_GLIBC_TUNABLES" "$PYTHON" bench/pytorch_bench.py --model "$model" "${common[@]}" ${compile[@]+"${compile[@]}"})"
        else
            out="$("$PYTHON" bench/pytorch_bench.py --model "$model" "${common[@]}" ${compile[@]+"${compile[@]}"})"
        fi
    fi
    # Keep only the JSON measurement lines (either side may log other things on stdout).
    grep '^{.*"train_img_s"' <<<"$out" | tee -a "$jsonl" >&2 || {
        echo "run.sh: $impl $model $config printed no measurement:" >&2
        echo "$out" >&2
        exit 1
    }
}

round=0
for _ in $(seq "$ROUNDS"); do
    for model in $MODELS; do
        for config in $CONFIGS; do
            if ((round % 2 == 0)); then
                run_one tricks "$model" "$config"
                run_one pytorch "$model" "$config"
            else
                run_one pytorch "$model" "$config"
                run_one tricks "$model" "$config"
            fi
            [[ -n "$COMPILE" ]] && run_one pytorch-compiled "$model" "$config"
            round=$((round + 1))
        done
    done
done

"$PYTHON" - "$jsonl" <<'EOF' | tee "$table"
import json, sys

def canon(r):
    # tricks prints {"model": "resnet50", "variant": "d"}, pytorch {"model": "resnet50d"}
    m, v = r["model"], r.get("variant")
    if not m.startswith("cifar_") and v in ("c", "d"):
        m += v
    return m

rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (canon(r), r["batch"], r["size"], r["precision"], bool(r["channels_last"]), r["device"])
    impl = "compiled" if r.get("compile") else r["impl"]
    rows.setdefault(key, {}).setdefault(impl, []).append(r)

def mean(rs, field):
    return sum(r[field] for r in rs) / len(rs) if rs else None

def fmt(v):
    return "-" if v is None else f"{v:.1f}"

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

def spread(ts, ps, field):
    # Round i of tricks against round i of pytorch (run next to each other).
    rs = [t[field] / p[field] for t, p in zip(ts, ps) if p[field]]
    return "-" if len(rs) < 2 else f"{min(rs):.2f}-{max(rs):.2f}"

def ops(rs):
    # Operator calls per training step (the same count on both sides; older lines lack it).
    vs = {r["ops_per_train_step"] for r in rs if "ops_per_train_step" in r}
    return "-" if not vs else "/".join(str(v) for v in sorted(vs))

compiled = any("compiled" in by for by in rows.values())
extra = " train compiled | ratio | infer compiled | ratio | compile s |" if compiled else ""
print("| model | batch | px | precision | channels_last | device | rounds | train tricks | train pytorch | train ratio | (per round) | infer tricks | infer pytorch | infer ratio | (per round) | ops/train step tricks | pytorch |" + extra)
print("|---|---:|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|" + ("---:|" * 5 if compiled else ""))
for key, by in rows.items():
    t, p, c = by.get("tricks", []), by.get("pytorch", []), by.get("compiled", [])
    tt, pt = mean(t, "train_img_s"), mean(p, "train_img_s")
    ti, pi = mean(t, "infer_img_s"), mean(p, "infer_img_s")
    model, batch, size, prec, cl, dev = key
    line = f"| {model} | {batch} | {size} | {prec} | {'yes' if cl else 'no'} | {dev} | {min(len(t), len(p))} | {fmt(tt)} | {fmt(pt)} | {ratio(tt, pt)} | {spread(t, p, 'train_img_s')} | {fmt(ti)} | {fmt(pi)} | {ratio(ti, pi)} | {spread(t, p, 'infer_img_s')} | {ops(t)} | {ops(p)} |"
    if compiled:
        ct, ci = mean(c, "train_img_s"), mean(c, "infer_img_s")
        line += f" {fmt(ct)} | {ratio(tt, ct)} | {fmt(ci)} | {ratio(ti, ci)} | {fmt(mean(c, 'first_steps_s'))} |"
    print(line)
print()
if compiled:
    modes = sorted({r["compile"] for by in rows.values() for r in by.get("compiled", [])})
    print(f"compiled: PyTorch through torch.compile (mode {', '.join(modes)}), the model only;")
    print("ratio = tricks / compiled; compile s = the first training and evaluation steps, which compile.")
print("img/s (mean over rounds); ratio = tricks / pytorch (> 1: tricks faster). ops: outermost operator")
print("calls per training step, counted alike on both sides (on a GPU each is at least one kernel launch;")
print("on a CPU tricks steps its flat optimizer buffer in cache-sized chunks, PyTorch's SGD goes tensor by tensor,")
print("and with channels_last tricks' fused CPU batch norm counts the calls it makes inside).")
EOF
echo "raw: $jsonl  table: $table" >&2
