# Sourced (not run) by the device scripts: bench/gpu.sh, bench/gpu_loader.sh, bench/paper_tables.sh.
# They run on the lent GPU machine (CUDA 13, PyTorch 2.11 in /opt/torch/.venv, no Rust, no
# network) from what bench/gpu_pack.sh put in data-local/gpu/, and on this machine for their CPU
# smoke checks. Expects `root` (the repository root). Sets:
#   PY      the Python with torch: /opt/torch/.venv there, .venv here (or PY from the caller)
#   pack    data-local/gpu
#   BIN     the tricks binary: BIN from the caller, else the pack's tricks.xz unpacked into a
#           temporary folder, else target/release/tricks
# and defines:
#   unpack NAME [FALLBACK]  the folder inside the pack's NAME.tar.gz, unpacked into a temporary
#                     folder; FALLBACK (or nothing) when the pack has no such file
#   link_torch        puts torch's libtorch and CUDA libraries on LD_LIBRARY_PATH (the binary was
#                     linked against the same torch==2.11.0 here); TORCH_SITE from a caller that
#                     sources this many times saves the seconds of importing torch
PY="${PY:-/opt/torch/.venv/bin/python3}"
[[ -x "$PY" ]] || PY="$root/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
pack="$root/data-local/gpu"
if [[ -z "${BIN:-}" ]]; then
    if [[ -f "$pack/tricks.xz" ]]; then
        # Here (not on the device, where target/ does not travel) a stale pack is an easy mistake.
        if [[ "$root/target/release/tricks" -nt "$pack/tricks.xz" ]]; then
            echo "warning: $pack/tricks.xz is older than target/release/tricks: rerun bench/gpu_pack.sh" >&2
        fi
        BIN="$(mktemp -d)/tricks"
        "$PY" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' \
            "$pack/tricks.xz" "$BIN"
        chmod +x "$BIN"
    else
        BIN="$root/target/release/tricks"
    fi
fi

unpack() {
    [[ -f "$pack/$1.tar.gz" ]] || { echo "${2:-}"; return 0; }
    local tmp
    tmp="$(mktemp -d)"
    tar -C "$tmp" -xzf "$pack/$1.tar.gz"
    find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1
}

link_torch() {
    local site ld d
    site="${TORCH_SITE:-$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')}"
    ld="$site/torch/lib"
    for d in "$site"/nvidia/*/lib; do [[ -d "$d" ]] && ld="$ld:$d"; done
    export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
