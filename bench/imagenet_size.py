#!/usr/bin/env python3
"""ImageNet-size JPEGs from a small ImageFolder (Imagenette 160 px) for loader benchmarks.

ImageNet's training JPEGs are about 500x375 (shorter side ~375, ~110 KB at quality ~90). A
GPU benchmark of the loader (issue 27, bench/gpu_loader.sh) needs files of that size, and the
device call carries at most 64 MiB: so it carries Imagenette's 160-px JPEGs and makes the large
ones there. Each image is resized (Lanczos) to a shorter side of --short px and saved at
--quality. Upscaled photos are smoother than real ones, so their files are smaller (about
28 KB at 500x375) and their entropy decoding is cheaper: a loader that keeps up here may not
keep up on real ImageNet files by the same margin; the summary prints the mean file size.

  python bench/imagenet_size.py ../shared/data/imagenette2-160 /tmp/inet --train 256 --val 26

takes the first --train (--val) files of each class, in name order, from SRC/train (SRC/val)
into DST/train (DST/val), with --jobs processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

from PIL import Image


def convert(job: tuple[str, str, int, int]) -> int:
    src, dst, short, quality = job
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = short / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.LANCZOS)
        im.save(dst, "JPEG", quality=quality)
    return os.path.getsize(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--short", type=int, default=375, help="shorter side of the output (px)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--train", type=int, default=256, help="images per class from train/")
    ap.add_argument("--val", type=int, default=26, help="images per class from val/")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    jobs = []
    for split, per_class in (("train", args.train), ("val", args.val)):
        split_dir = args.src / split
        if not split_dir.is_dir():
            sys.exit(f"{split_dir}: no such folder (expected an ImageFolder tree with train/ and val/)")
        for cls in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
            (args.dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in files[:per_class]:
                jobs.append((str(f), str(args.dst / split / cls.name / (f.stem + ".jpg")), args.short, args.quality))
    with Pool(args.jobs) as pool:
        sizes = pool.map(convert, jobs, chunksize=16)
    print(f"{len(sizes)} images, shorter side {args.short} px, mean {sum(sizes) / max(len(sizes), 1) / 1024:.1f} KB "
          f"-> {args.dst}")


if __name__ == "__main__":
    main()
