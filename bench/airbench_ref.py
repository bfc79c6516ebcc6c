#!/usr/bin/env python3
"""Same-run reference for the CIFAR-10 time-to-accuracy figure of bench/gpu.sh: airbench94.

airbench94 (Keller Jordan, github.com/KellerJordan/cifar10-airbench; the `airbench` package on
PyPI, MIT licence, not part of this repository: bench/gpu_pack.sh downloads it into the carried
folder) is the fastest published CIFAR-10 trainer. This script trains it, unchanged, on the same
CIFAR-10 JPEGs that tricks trains on (decoded with Pillow, classes in alphabetical order as
tricks' ImageFolder reads them) and prints what airbench itself reports for each run:

  {"airbench94": RUN, "tta_val_acc": ..., "seconds": ..., "val_acc_per_epoch": [...], ...}

`seconds` is airbench's own `total_time_seconds`: whitening initialisation + training + the final
test-time-augmented evaluation, timed with CUDA events; its per-epoch evaluations are not timed.
The first call (`warmup94`) compiles and autotunes and is not reported.

  python bench/airbench_ref.py --data DIR --package DIR [--runs 3]
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time


def decode_split(root: str, split: str):
    import numpy as np
    import torch
    from PIL import Image

    classes = sorted(d for d in os.listdir(os.path.join(root, split)) if not d.startswith("."))
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        for f in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, f)) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    return {
        "images": torch.from_numpy(np.stack(images)),  # N x 32 x 32 x 3 uint8, as airbench stores it
        "labels": torch.tensor(labels, dtype=torch.int64),
        "classes": classes,
    }


def parse_rows(text: str):
    """airbench's printed table: |  run  |  epoch  |  train_loss  | ... |  total_time_seconds  |."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[1] == "epoch":
            continue
        rows.append(cells)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 ImageFolder root (train/ and test/)")
    ap.add_argument("--package", required=True, help="folder that holds the `airbench` package")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch

    start = time.perf_counter()
    work = tempfile.mkdtemp()
    os.makedirs(os.path.join(work, "cifar10"))
    for split, name in (("train", "train.pt"), ("test", "test.pt")):
        torch.save(decode_split(args.data, split), os.path.join(work, "cifar10", name))
    decode_s = time.perf_counter() - start
    # airbench reads cifar10/train.pt and cifar10/test.pt relative to the working directory.
    os.chdir(work)
    sys.path.insert(0, os.path.abspath(args.package))
    import airbench

    with contextlib.redirect_stdout(io.StringIO()):
        airbench.warmup94()
    for run in range(args.runs):
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            airbench.train94(run=run)
        wall = time.perf_counter() - t0
        rows = parse_rows(out.getvalue())
        final = [r for r in rows if r[1] == "eval"]
        epochs = [r for r in rows if r[1] not in ("eval", "")]
        print(json.dumps({
            "airbench94": run,
            "tta_val_acc": round(100 * float(final[0][5]), 2) if final else None,
            "seconds": float(final[0][6]) if final else None,
            "val_acc_per_epoch": [round(100 * float(r[4]), 2) for r in epochs if r[4]],
            "wall_s_with_untimed_evaluations": round(wall, 2),
            "decode_s": round(decode_s, 1),
            "device": torch.cuda.get_device_name(0),
            "airbench_file": os.path.abspath(airbench.__file__),
        }), flush=True)


if __name__ == "__main__":
    main()
