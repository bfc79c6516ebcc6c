#!/usr/bin/env python3
"""`tricks bench` against bench/pytorch_bench.py, step by step in lockstep.

Both run side by side, each with its model, batch and optimizer built and warmed up, and take
turns: one training step of tricks, one of PyTorch (the order swaps every pair), then one
inference step each, for --pairs pairs. Only one computes at a time, so each gets the whole
machine for its step; and since the two steps of a pair are seconds apart at most, a shared
machine's drifting speed (on the 2-core development VM, 2x within a minute) hits both alike.
The figure is the median over pairs of PyTorch's step time over tricks' (> 1: tricks faster),
with its quartiles; run.sh's separate runs can only average the drift away.

  .venv/bin/python bench/lockstep.py --model airbench94 --precision bf16 --channels-last --pairs 40

Prints one JSON line (per-step medians in ms, img/s from them, ratios); --out FILE also writes
every step's time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from pytorch_bench import DEFAULTS  # noqa: E402  model -> (batch, px, classes), one table for both sides


def tricks_model(name: str) -> list[str]:
    # The Rust CLI names an architecture by depth + paper variant: resnet50d = resnet50, variant d.
    if name == "resnet50d":
        return ["--model", "resnet50", "--variant", "d"]
    return ["--model", name, "--variant", "a"]


class Side:
    """One benchmark process speaking the lockstep protocol (`ready`, then a time per command)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.wait_for("ready")

    def fail(self, what: str) -> None:
        self.proc.kill()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise SystemExit(f"lockstep: {self.name} {what}\n{err}")

    def wait_for(self, word: str) -> None:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.fail(f"exited before printing {word!r}")
            if line.strip() == word:
                return

    def step(self, kind: str) -> float:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        try:
            return float(line)
        except ValueError:
            self.fail(f"answered {line!r} to {kind!r}")
            raise

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 3), round(q[2], 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet20",
                    help="pytorch_bench.py's name: cifar_resnet20, cifar_resnet56, resnet50d, airbench94, resnet18")
    ap.add_argument("--batch", type=int, default=0, help="default: pytorch_bench.py's for the model")
    ap.add_argument("--size", type=int, default=0, help="default: pytorch_bench.py's for the model (32 with --cifar-stem)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="both sides (default: torch.get_num_threads())")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training and inference steps each")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--tricks-bin", default=str(ROOT / "target/release/tricks"))
    ap.add_argument("--pytorch-glibc-tunables", default="",
                    help="GLIBC_TUNABLES for PyTorch only, e.g. the allocator settings tricks makes itself")
    ap.add_argument("--out", help="also write every step's milliseconds here (JSON)")
    args = ap.parse_args()
    if args.pairs < 4:
        ap.error("--pairs must be at least 4 (quartiles)")

    import torch  # only for its default thread count, which both sides then use

    if args.model not in DEFAULTS:
        ap.error(f"unknown model {args.model!r}; known: {', '.join(DEFAULTS)}")
    threads = args.threads or torch.get_num_threads()
    batch, size, _ = DEFAULTS[args.model]
    if args.cifar_stem:
        size = 32
    batch, size = args.batch or batch, args.size or size
    common = ["--batch", str(batch), "--size", str(size), "--precision", args.precision,
              "--device", args.device, "--threads", str(threads), "--warmup", str(args.warmup), "--lockstep"]
    if args.channels_last:
        common.append("--channels-last")
    if args.cifar_stem:
        common.append("--cifar-stem")
    env = dict(os.environ)
    py_env = dict(env)
    if args.pytorch_glibc_tunables:
        py_env["GLIBC_TUNABLES"] = args.pytorch_glibc_tunables

    print(f"lockstep: {args.model} batch {batch} at {size} px, {args.precision}"
          f"{' + channels_last' if args.channels_last else ''}, {threads} threads, {args.pairs} pairs",
          file=sys.stderr)
    tricks = Side("tricks", [args.tricks_bin, "bench", *tricks_model(args.model), *common], env)
    pytorch = Side("pytorch", [sys.executable, str(ROOT / "bench/pytorch_bench.py"), "--model", args.model,
                               *common], py_env)
    times: dict[str, dict[str, list[float]]] = {k: {"tricks": [], "pytorch": []} for k in ("train", "infer")}
    for i in range(args.pairs):
        order = (tricks, pytorch) if i % 2 == 0 else (pytorch, tricks)
        for kind in ("train", "infer"):
            for side in order:
                times[kind][side.name].append(side.step(kind))
    tricks.close()
    pytorch.close()

    result: dict = {"model": args.model, "batch": batch, "size": size, "precision": args.precision,
                    "channels_last": args.channels_last, "cifar_stem": args.cifar_stem, "device": args.device,
                    "threads": threads, "pairs": args.pairs, "warmup": args.warmup}
    for kind, t in times.items():
        ratios = [p / r for r, p in zip(t["tricks"], t["pytorch"])]
        med = {k: statistics.median(v) for k, v in t.items()}
        result[kind] = {
            "tricks_ms": round(med["tricks"], 2),
            "pytorch_ms": round(med["pytorch"], 2),
            "tricks_img_s": round(1e3 * batch / med["tricks"], 1),
            "pytorch_img_s": round(1e3 * batch / med["pytorch"], 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_quartiles": quartiles(ratios),
            "pairs_tricks_faster": sum(r > 1 for r in ratios),
        }
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"result": result, "ms": times}) + "\n")


if __name__ == "__main__":
    main()
