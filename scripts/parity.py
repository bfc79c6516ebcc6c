#!/usr/bin/env python3
"""Reference outputs for the Rust/PyTorch parity test (`tests/parity.rs`).

Usage: scripts/parity.py OUTDIR [--seed N] [--models a,b,...]

For every reference model (timm / torchvision, random seeded weights) this writes

  OUTDIR/<name>.safetensors     the state_dict (contiguous tensors, num_batches_tracked kept)
  OUTDIR/<name>.io.safetensors  tensors `input` [2,3,S,S] f32 (S: the entry's size, 224 for most,
                                225 for *_odd, 112 for the ResNeXt/SE entries) and
                                `logits` [2,1000] f32
  OUTDIR/manifest.json          [{name, tricks_model, variant, num_classes, source, weights,
                                  io, seed, versions, ...}, ...]

BatchNorm γ/β and running statistics are randomised so that no BN is the identity (timm
also zero-initialises the last BN γ of every block, which would hide most of the network).
Everything runs on CPU in float32, eval mode.

Needs torch, timm, torchvision and safetensors (`scripts/setup.sh --with-timm`).

Key layout checked here (and relied on by the Rust model):
  stem   conv1.weight, bn1.*                          (ResNet-A/B, 7x7 stride-2 conv, 64 ch)
         conv1.0 / conv1.1 / conv1.3 / conv1.4 / conv1.6, bn1.*
                                                      (deep stem, C/D: 3x3 s2 3→32, BN, ReLU,
                                                       3x3 32→32, BN, ReLU, 3x3 32→64; then bn1)
  blocks layerX.Y.conv{1,2[,3]}, layerX.Y.bn{1,2[,3]}
  short  layerX.0.downsample.0 (conv 1x1, stride s), .1 (BN)           (A/B/C)
         layerX.0.downsample.0 = AvgPool2d(2, s, ceil_mode=True, count_include_pad=False)
                                 or Identity when s == 1 (no params),
         layerX.0.downsample.1 (conv 1x1 stride 1), .2 (BN)            (D)
  se     layerX.Y.se.fc1.{weight,bias}, layerX.Y.se.fc2.{weight,bias}   (SE: timm's SEModule with its
                                                      defaults, after the last BN of the block)
  groups layerX.Y.conv2 in `cardinality` groups, floor(planes * base_width / 64) * cardinality wide
                                                      (ResNeXt)
  head   fc.weight, fc.bias
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# name (file stem), source, tricks_model, variant, input size
REFERENCE = [
    # timm resnet50 is torchvision's v1.5: stride on the 3x3 conv = the paper's ResNet-B.
    ("resnet50", "timm", "resnet50", "b", 224),
    ("resnet50c", "timm", "resnet50", "c", 224),
    ("resnet50d", "timm", "resnet50", "d", 224),
    ("tv_resnet50", "torchvision", "resnet50", "b", 224),
    # Basic blocks have no stride placement difference: timm resnet18 is "b" (== "a").
    ("resnet18", "timm", "resnet18", "b", 224),
    ("resnet18d", "timm", "resnet18", "d", 224),
    # 224 px keeps every feature map even (56/28/14/7), where ceil_mode and padding choices of
    # the pools cannot show. 225 px gives odd maps (113, 57, 29, 15, 8): stem convs, max pool
    # and the D shortcut's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) all see an
    # odd input.
    ("resnet50d_odd", "timm", "resnet50", "d", 225),
    # ResNeXt and squeeze-and-excitation (timm's `cardinality`, `base_width`, `attn_layer='se'`).
    # timm's resnext50_32x4d, seresnet50 and seresnext50_32x4d are ResNet-B like its resnet50;
    # seresnext26d_32x4d is the D variant (deep stem of 32, 32, 64 and average-pool shortcut) of
    # a 26-layer (2, 2, 2, 2) bottleneck network; seresnet18 has SE in basic blocks. 112 px keeps
    # the test's time down (model building and loading dominate it, not the forward) and gives
    # layer4 an odd input (maps 56/28/14/7/4), where the D shortcut's ceil-mode pool pads.
    ("resnext50_32x4d", "timm", "resnext50_32x4d", "b", 112),
    ("seresnet50", "timm", "seresnet50", "b", 112),
    ("seresnext50_32x4d", "timm", "seresnext50_32x4d", "b", 112),
    ("seresnext26d_32x4d", "timm", "seresnext26_32x4d", "d", 112),
    ("seresnet18", "timm", "seresnet18", "b", 112),
    # airbench94's network (transcribed below from airbench 0.1.8's lib_airbench94.py), its
    # state_dict renamed to this project's names; 32 px, as it is built for.
    ("airbench94", "airbench", "airbench94", "a", 32),
]

NUM_CLASSES = 1000
BATCH = 2


def airbench94_net(num_classes: int):
    """make_net94 of airbench 0.1.8 (lib_airbench94.py), on the CPU in float32."""
    import torch
    from torch import nn

    class Conv(nn.Conv2d):
        def __init__(self, cin, cout, kernel_size=3, padding="same", bias=False):
            super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    class BatchNorm(nn.BatchNorm2d):
        def __init__(self, c, momentum=0.6, eps=1e-12):
            super().__init__(c, eps=eps, momentum=1 - momentum)
            self.weight.requires_grad = False

    class ConvGroup(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1 = Conv(cin, cout)
            self.pool = nn.MaxPool2d(2)
            self.norm1 = BatchNorm(cout)
            self.conv2 = Conv(cout, cout)
            self.norm2 = BatchNorm(cout)
            self.activ = nn.GELU()

        def forward(self, x):
            x = self.activ(self.norm1(self.pool(self.conv1(x))))
            return self.activ(self.norm2(self.conv2(x)))

    class Mul(nn.Module):
        def forward(self, x):
            return x * (1 / 9)

    return nn.Sequential(
        Conv(3, 24, 2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(24, 64),
        ConvGroup(64, 256),
        ConvGroup(256, 256),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(256, num_classes, bias=False),
        Mul(),
    )


def airbench94_names(key: str) -> str:
    """airbench's Sequential indices → this project's names (src/model/airbench.rs)."""
    head, _, rest = key.partition(".")
    return {"0": "whiten", "2": "block1", "3": "block2", "4": "block3", "7": "fc"}[head] + "." + rest


def die(msg: str, code: int = 2) -> None:
    print(f"parity.py: {msg}", file=sys.stderr)
    sys.exit(code)


def build(source: str, name: str):
    import torch

    if source == "timm":
        import timm

        return timm.create_model(name.removesuffix("_odd"), pretrained=False, num_classes=NUM_CLASSES)
    if source == "airbench":
        return airbench94_net(10)
    if source == "torchvision":
        import torchvision

        assert name == "tv_resnet50"
        return torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    raise ValueError(source)


def randomise(model, gen) -> None:
    """Random (seeded) weights everywhere, BN made non-trivial."""
    import torch
    from torch import nn

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.25)
                mod.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                mod.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
            elif isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (1.0 / mod.in_features) ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)


def check_keys(name: str, variant: str, model, keys: list[str]) -> list[str]:
    """Assert the state_dict layout the Rust model is written against; returns summary lines."""
    from torch import nn

    ks = set(keys)
    notes = []
    deep = variant in ("c", "d")
    if deep:
        for k in ("conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight"):
            assert k in ks, f"{name}: missing deep-stem key {k}"
        assert "conv1.weight" not in ks
        widths = [tuple(model.conv1[i].weight.shape) for i in (0, 3, 6)]
        assert widths == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)], widths
        assert [model.conv1[i].stride for i in (0, 3, 6)] == [(2, 2), (1, 1), (1, 1)]
        notes.append("deep stem conv1.{0,1,3,4,6} widths 32,32,64 (first conv stride 2)")
    else:
        assert "conv1.weight" in ks and tuple(model.conv1.weight.shape) == (64, 3, 7, 7)
        notes.append("stem conv1 7x7/2 64ch")
    assert "bn1.weight" in ks
    mp = model.maxpool
    assert (mp.kernel_size, mp.stride, mp.padding, mp.ceil_mode) == (3, 2, 1, False), mp
    assert "fc.weight" in ks and "fc.bias" in ks

    for li in range(1, 5):
        layer = getattr(model, f"layer{li}")
        b0 = layer[0]
        ds = b0.downsample
        stride = 1 if li == 1 else 2
        # ResNet-B and later: stride on the 3x3 conv (conv2 in bottleneck, conv1 in basic block).
        bottleneck = hasattr(b0, "conv3")
        strided = b0.conv2 if bottleneck else b0.conv1
        assert strided.stride == (stride, stride), (name, li, strided)
        if bottleneck:
            assert b0.conv1.stride == (1, 1)
        if ds is None:
            assert not bottleneck and li == 1, (name, li)
            assert not any(k.startswith(f"layer{li}.0.downsample") for k in ks)
            continue
        p = f"layer{li}.0.downsample"
        if variant == "d":
            assert f"{p}.0.weight" not in ks
            assert f"{p}.1.weight" in ks and f"{p}.2.weight" in ks and f"{p}.2.running_var" in ks
            conv = ds[1]
            assert conv.stride == (1, 1), conv
            pool = ds[0]
            if stride == 1:
                assert isinstance(pool, nn.Identity), pool
            else:
                assert isinstance(pool, nn.AvgPool2d), pool
                assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad) == (
                    2,
                    2,
                    0,
                    True,
                    False,
                ), pool
        else:
            assert f"{p}.0.weight" in ks and f"{p}.1.weight" in ks and f"{p}.2.weight" not in ks
            assert ds[0].stride == (stride, stride), ds[0]
    se = [m for m in model.modules() if type(m).__name__ == "SEModule"]
    if se:
        for m in se:
            assert isinstance(m.bn, nn.Identity) and isinstance(m.act, nn.ReLU), m
            assert type(m.gate).__name__ == "Sigmoid" and not m.add_maxpool, m  # timm's or torch's
            assert m.fc1.bias is not None and m.fc2.bias is not None, m
        blocks = [b for li in range(1, 5) for b in getattr(model, f"layer{li}")]
        assert all(b.se is not None for b in blocks), name
        for layer in (model.layer1, model.layer4):
            c = layer[0].se.fc1.in_channels
            notes.append(f"se {c}->{layer[0].se.fc1.out_channels}->{c}")
    groups = {b.conv2.groups for li in range(1, 5) for b in getattr(model, f"layer{li}")}
    assert len(groups) == 1, groups
    if groups != {1}:
        notes.append(f"conv2 groups {groups.pop()}, layer1 width {model.layer1[0].conv2.in_channels}")
    if variant == "d":
        notes.append("shortcut downsample.0=AvgPool2d(2,2,ceil_mode=True,count_include_pad=False)|Identity(s=1), .1 conv1x1/1, .2 BN")
    else:
        notes.append("shortcut downsample.0 conv1x1/s, .1 BN")
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=20190101)
    ap.add_argument("--models", default="", help="comma-separated subset of: " + ",".join(r[0] for r in REFERENCE))
    args = ap.parse_args()

    try:
        import torch
        from safetensors.torch import save_file
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:  # the Rust test turns exit code 3 into a skip
        die(f"missing python package: {e.name} (run scripts/setup.sh --with-timm)", code=3)

    wanted = [m for m in args.models.split(",") if m]
    unknown = set(wanted) - {r[0] for r in REFERENCE}
    if unknown:
        die(f"unknown model(s): {sorted(unknown)}")

    torch.set_grad_enabled(False)
    args.outdir.mkdir(parents=True, exist_ok=True)

    inputs = {}  # one fixed input per size, shared by the models of that size
    for size in sorted({r[4] for r in REFERENCE}):
        gen = torch.Generator().manual_seed(args.seed * 1000 + size)
        inputs[size] = torch.randn((BATCH, 3, size, size), generator=gen).contiguous()

    entries = []
    for idx, (name, source, tricks_model, variant, size) in enumerate(REFERENCE):
        if wanted and name not in wanted:
            continue
        model = build(source, name)
        randomise(model, torch.Generator().manual_seed(args.seed + 1 + idx))
        model.eval()
        sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if source == "airbench":
            sd = {airbench94_names(k): v for k, v in sd.items()}
            notes = ["airbench94 keys renamed"]
        else:
            notes = check_keys(name, variant, model, list(sd))
        x = inputs[size]
        logits = model(x).contiguous()
        num_classes = 10 if source == "airbench" else NUM_CLASSES
        assert logits.shape == (BATCH, num_classes) and torch.isfinite(logits).all()

        weights = f"{name}.safetensors"
        io = f"{name}.io.safetensors"
        save_file(sd, str(args.outdir / weights))
        save_file({"input": x, "logits": logits}, str(args.outdir / io))
        n_params = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
        entries.append(
            {
                "name": name,
                "source": source,
                "tricks_model": tricks_model,
                "variant": variant,
                "num_classes": num_classes,
                "weights": weights,
                "io": io,
                "input_shape": list(x.shape),
                "num_tensors": len(sd),
                "num_values": n_params,
            }
        )
        print(
            f"{name:18s} {source:11s} -> {tricks_model} variant {variant} @{size}px: {len(sd)} tensors, "
            f"{n_params / 1e6:.2f}M values, |logits|max {logits.abs().max().item():.3f} std {logits.std().item():.3f}; "
            + "; ".join(notes)
        )

    import timm
    import torchvision
    import safetensors

    versions = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "safetensors": safetensors.__version__,
    }
    for e in entries:
        e["seed"] = args.seed
        e["versions"] = versions
    (args.outdir / "manifest.json").write_text(json.dumps(entries, indent=2) + "\n")
    print(f"wrote {len(entries)} models to {args.outdir}/ (manifest.json)")


if __name__ == "__main__":
    main()
