#!/usr/bin/env python3
"""Per-core cost of torchvision's ImageNet training pipeline, the reference of bench/loader_per_core.sh.

One process, one thread, no DataLoader workers: each image of DIR/train is read by torchvision's
ImageFolder (PIL, libjpeg-turbo) and transformed, so img/s is what one core of a DataLoader
worker delivers. Three pipelines:
  decode        ImageFolder's loader only (open + decode + RGB)
  reference     torchvision's classification preset: RandomResizedCrop(SIZE) bilinear + antialias,
                horizontal flip, PILToTensor, float, Normalize
  paper         the paper's (He et al. 2019 §2.1, as tricks' pipeline = "imagenet"):
                RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4), ToTensor, Normalize
                (tricks adds PCA lighting noise, which torchvision has no transform for)
Prints one JSON line per pipeline: images, wall img/s, img/s per CPU-second.

  python bench/torchvision_loader.py /tmp/imagenet-size [--size 224] [--limit 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision import datasets
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=2000, help="images per pipeline (at most)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rrc = T.RandomResizedCrop(args.size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    pipelines = {
        "decode": None,
        "reference": T.Compose([rrc, T.RandomHorizontalFlip(), T.PILToTensor(),
                                T.ConvertImageDtype(torch.float), T.Normalize(MEAN, STD)]),
        "paper": T.Compose([rrc, T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(),
                            T.Normalize(MEAN, STD)]),
    }
    for name, transform in pipelines.items():
        dataset = datasets.ImageFolder(str(args.dir / "train"), transform=transform)
        n = min(len(dataset), args.limit)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            dataset[i]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"torchvision_pipeline": name, "images": n, "img_s": round(n / wall),
                          "img_s_per_cpu_s": round(n / cpu)}), flush=True)


if __name__ == "__main__":
    main()
