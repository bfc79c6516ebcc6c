#!/usr/bin/env python3
"""The PyTorch reference of `tricks predict`, as timm's inference.py does it: a DataLoader over
the image files (PIL decode, torchvision's Resize + CenterCrop + ToTensor in the workers), the
network in evaluation mode, softmax and top-k, one CSV row per image.

    bench/predict_ref.py --module model.pt --folder DIR --csv out.csv [--batch 64] [--workers 2]
        [--threads 2]

The network is the TorchScript module `tricks export` wrote for the checkpoint (so both sides run
the same weights); the preprocessing is the one in its JSON (resize the shorter side and centre-
crop, or none). Prints one JSON line: images, seconds (from the first batch requested to the last
row written, model load excluded), images per second.
"""

import argparse
import csv
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=5)
    args = ap.parse_args()

    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(args.threads)
    with open(os.path.splitext(args.module)[0] + ".json") as f:
        info = json.load(f)
    pre = info["preprocessing"]
    steps = []
    if pre["resize_shorter_side"]:
        steps += [transforms.Resize(pre["resize_shorter_side"]), transforms.CenterCrop(pre["center_crop"])]
    steps.append(transforms.ToTensor())
    tf = transforms.Compose(steps)
    exts = (".jpg", ".jpeg", ".png")
    paths = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(args.folder) for f in fs if f.lower().endswith(exts)
    )

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(paths[i]).convert("RGB")), i

    model = torch.jit.load(args.module, map_location="cpu").eval()
    classes = info["classes"]
    k = min(args.topk, len(classes))
    loader = torch.utils.data.DataLoader(
        Files(), batch_size=args.batch, num_workers=args.workers, shuffle=False
    )
    t0 = time.perf_counter()
    with open(args.csv, "w", newline="") as f, torch.inference_mode():
        w = csv.writer(f)
        w.writerow(["path"] + [x for i in range(1, k + 1) for x in (f"class_{i}", f"probability_{i}")])
        for x, idx in loader:
            p, c = model(x).softmax(1).topk(k, 1)
            for i, ps, cs in zip(idx.tolist(), p.tolist(), c.tolist()):
                w.writerow([paths[i]] + [v for pc in zip(cs, ps) for v in (classes[pc[0]], f"{pc[1]:.6g}")])
    secs = time.perf_counter() - t0
    print(json.dumps({"images": len(paths), "seconds": secs, "images_per_second": len(paths) / secs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
