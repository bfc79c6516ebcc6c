#!/usr/bin/env python3
"""ONNX from a module written by `tricks export`, checked by running both.

    .venv/bin/python scripts/to_onnx.py model.pt [--out model.onnx] [--opset 17]

Reads the JSON that `tricks export` wrote beside the module (its input shape), converts the
TorchScript module with PyTorch's TorchScript-based ONNX exporter (`torch.onnx.export(...,
dynamo=False)`: the torch.export-based one takes `nn.Module`s, not TorchScript), with the batch
dimension dynamic, then runs the ONNX file in onnxruntime and the TorchScript module in PyTorch on
the same random inputs (the exported batch and a batch of 3) and fails if they differ by more than
1e-4 (fp32; bf16 modules are refused: ONNX Runtime's CPU provider has no bf16 convolution). Adds
"onnx" (file name, opset, the largest difference) to the JSON. Needs onnx and onnxruntime
(scripts/setup.sh --with-timm installs them).
"""

import argparse
import json
import os
import sys
import warnings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="TorchScript file written by `tricks export`")
    ap.add_argument("--out", help="ONNX file (default: the module's name with .onnx)")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    info_path = os.path.splitext(args.module)[0] + ".json"
    try:
        with open(info_path) as f:
            info = json.load(f)
    except OSError as e:
        print(f"to_onnx.py: cannot read {info_path} (written by `tricks export` beside the module): {e}", file=sys.stderr)
        return 2
    if info.get("precision") != "fp32":
        print(f"to_onnx.py: {args.module} is {info.get('precision')}: export the checkpoint with --precision fp32 for ONNX", file=sys.stderr)
        return 2
    out = args.out or os.path.splitext(args.module)[0] + ".onnx"
    module = torch.jit.load(args.module, map_location="cpu")
    shape = info["input"]["shape"]
    segmentation = info["task"] == "segmentation"
    output_axes = {0: "batch"}
    torch.manual_seed(0)
    x = torch.rand(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            out,
            dynamo=False,
            opset_version=args.opset,
            input_names=["image"],
            output_names=["mask_logits" if segmentation else "logits"],
            dynamic_axes={"image": {0: "batch"}, "mask_logits" if segmentation else "logits": output_axes},
        )
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in sorted({shape[0], 3}):
        xb = torch.rand(batch, *shape[1:])
        with torch.no_grad():
            want = module(xb).numpy()
        got = session.run(None, {"image": xb.numpy()})[0]
        if got.shape != want.shape:
            print(f"to_onnx.py: ONNX output {got.shape} against TorchScript {want.shape} (batch {batch})", file=sys.stderr)
            os.remove(out)
            return 1
        worst = max(worst, float(np.abs(got - want).max()))
    scale = 1.0 + float(np.abs(want).max())
    if worst > 1e-4 * scale:
        print(f"to_onnx.py: ONNX Runtime and TorchScript differ by {worst:.3e}; {out} removed", file=sys.stderr)
        os.remove(out)
        return 1
    info["onnx"] = {"file": os.path.basename(out), "opset": args.opset, "dynamic_batch": True,
                    "check_max_abs_diff": worst}
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    os.replace(info_path + ".tmp", info_path)
    print(f"wrote {out} (opset {args.opset}, dynamic batch); ONNX Runtime against TorchScript: max |difference| {worst:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
