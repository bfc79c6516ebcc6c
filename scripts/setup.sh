#!/usr/bin/env bash
# Python side of `tricks`: the libtorch that tch links against, plus the reference libraries
# used by the parity test and the PyTorch benchmark.
#
#   scripts/setup.sh              .venv with torch==2.11.0 (libtorch for the tch build)
#   scripts/setup.sh --with-timm  ... plus timm, torchvision, safetensors, scipy, tensorboard,
#                                 pycocotools, onnx and onnxruntime (tests/parity.rs,
#                                 scripts/parity.py, bench/pytorch_bench.py, tests/stats_scipy.rs,
#                                 tests/tensorboard.rs, tests/detect_*.rs, tests/export.rs,
#                                 scripts/to_onnx.py)
#
# Idempotent: creates .venv in the repo root only if missing and installs a package only when
# it does not import or is at another version. Environment: PYTHON (interpreter that creates
# the venv, default python3), PIP_ARGS (extra pip arguments, e.g. --index-url of a CPU build).
set -euo pipefail

TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0 # the torchvision release built against torch 2.11
TIMM_VERSION=1.0.31
SAFETENSORS_VERSION=0.8.0
SCIPY_VERSION=1.17.1 # the reference of the study statistics (tests/stats_scipy.rs)
TENSORBOARD_VERSION=2.20.0 # reads back the runs' event files (tests/tensorboard.rs)
PYCOCOTOOLS_VERSION=2.0.11 # the reference of the detection mAP (tests/detect_eval.rs)
ONNX_VERSION=1.23.2          # scripts/to_onnx.py writes ONNX from an exported TorchScript module
ONNXRUNTIME_VERSION=1.32.0   # ... and runs it beside the TorchScript module to check it

with_timm=0
for arg in "$@"; do
    case "$arg" in
        --with-timm) with_timm=1 ;;
        -h | --help)
            sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument: $arg (expected --with-timm)" >&2
            exit 2
            ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"
read -r -a pip_args <<<"${PIP_ARGS:-}"

if [[ -x "$py" ]]; then
    echo "venv: $venv exists ($("$py" --version 2>&1))"
else
    echo "venv: creating $venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$venv"
fi

# "module pip-name version" per wanted package
wanted=("torch torch $TORCH_VERSION")
if [[ "$with_timm" == 1 ]]; then
    wanted+=("torchvision torchvision $TORCHVISION_VERSION"
        "safetensors safetensors $SAFETENSORS_VERSION"
        "timm timm $TIMM_VERSION"
        "scipy scipy $SCIPY_VERSION"
        "tensorboard tensorboard $TENSORBOARD_VERSION"
        "pycocotools pycocotools $PYCOCOTOOLS_VERSION"
        "onnx onnx $ONNX_VERSION"
        "onnxruntime onnxruntime $ONNXRUNTIME_VERSION")
fi

# One python process imports every wanted module and prints "module version" (without the
# +local suffix) or "module -" when the import fails.
probe_src='
import importlib, importlib.metadata, sys, warnings
warnings.filterwarnings("ignore")
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        # pycocotools has no __version__: its distribution metadata has.
        version = getattr(module, "__version__", None) or importlib.metadata.version(name)
        print(name, version.split("+")[0])
    except Exception:
        print(name, "-")
'

# check: prints the unsatisfied requirements (pkg==version), one a line; messages on stderr.
check() {
    local modules=() line module pkg want have found
    for line in "${wanted[@]}"; do modules+=("${line%% *}"); done
    found="$("$py" -c "$probe_src" "${modules[@]}" 2>/dev/null || true)"
    for line in "${wanted[@]}"; do
        read -r module pkg want <<<"$line"
        have="$(awk -v m="$module" '$1 == m { print $2 }' <<<"$found")"
        if [[ "$have" == "$want" ]]; then
            echo "$pkg: $want already installed" >&2
        elif [[ -z "$have" || "$have" == - ]]; then
            echo "$pkg: does not import, needs $pkg==$want" >&2
            echo "$pkg==$want"
        else
            echo "$pkg: found $have, needs $pkg==$want" >&2
            echo "$pkg==$want"
        fi
    done
}

pip_install() {
    echo "pip install $*"
    "$py" -m pip install ${pip_args[@]+"${pip_args[@]}"} "$@"
}

mapfile -t todo < <(check)
if ((${#todo[@]} > 0)); then
    # torch is pinned in the same command so that dependency resolution cannot replace it.
    [[ " ${todo[*]} " == *" torch==$TORCH_VERSION "* ]] || todo+=("torch==$TORCH_VERSION")
    pip_install "${todo[@]}"
    mapfile -t todo < <(check 2>/dev/null)
    if [[ " ${todo[*]} " == *" torch==$TORCH_VERSION "* ]]; then
        # The right version is installed but does not import: reinstall it.
        pip_install --force-reinstall --no-deps "torch==$TORCH_VERSION"
        mapfile -t todo < <(check 2>/dev/null)
    fi
    if ((${#todo[@]} > 0)); then
        echo "setup.sh: still not satisfied after pip install: ${todo[*]}" >&2
        exit 1
    fi
    echo "installed: all requirements satisfied"
else
    echo "nothing to install"
fi

# NCCL process groups (distributed training on GPUs) are compiled against the CUDA runtime and
# NCCL headers that the CUDA torch wheel's dependencies install. The runtime headers also need
# crt/ (nvidia-cuda-crt) and nv/target (nvidia-cuda-cccl), which torch does not depend on.
# Without them the build still succeeds, with Gloo (CPU) only.
cu_inc="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include"))' 2>/dev/null || true)"
if [[ -n "$cu_inc" && -f "$cu_inc/cuda_runtime_api.h" ]] &&
    [[ ! -f "$cu_inc/crt/host_config.h" || ! -e "$cu_inc/nv/target" ]]; then
    pip_install "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" ||
        echo "setup.sh: CUDA headers not installed: NCCL will be unavailable in this build" >&2
fi
echo "python: $py"
echo "libtorch: $("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
