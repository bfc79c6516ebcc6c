#!/usr/bin/env python3
"""PyTorch reference for the speed of `tricks bench` (same models, optimizer and measurement).

Models (identical in structure to the Rust ones):
  cifar_resnet20 / cifar_resnet56  He et al. 2016 CIFAR ResNet-(6n+2): 3x3 conv 16 + BN + ReLU,
                                   3 stages of n basic blocks (16/32/64 channels, stride 2 at
                                   stages 2 and 3), projection shortcut (1x1 conv stride s + BN,
                                   "option B") where the shape changes, global avg pool, fc.
  resnet50d                        timm `resnet50d` (ResNet-50-D of He et al. 2019).
  resnext50_32x4d, seresnet50,     timm's (32 groups of 4 channels in the 3x3 convs; squeeze-and-
  seresnext50_32x4d                excitation after each block's last conv), as tricks' family.
  airbench94                       airbench 0.1.8's make_net94 (scripts/parity.py; 32 px, batch
                                   1024, 10 classes), whitening conv frozen as in training.
  resnet18 [--cifar-stem]          torchvision's ResNet-18; with --cifar-stem a 3x3 stride-1 stem
                                   and no max-pool (tricks' model.cifar_stem), 32 px, 10 classes.
Defaults: cifar_* at 32 px batch 128 (10 classes), resnet50d at 224 px batch 16 (1000 classes).

Training step = forward + cross-entropy + backward + SGD step (momentum 0.9, nesterov,
weight decay 1e-4, lr 0.1, foreach default) on one fixed synthetic batch, timed after
`--warmup` steps. Inference = eval mode under torch.no_grad(), same batch. With
`--precision bf16` forward and loss run under torch.autocast(device, dtype=torch.bfloat16)
(weights stay f32); `--precision fp16` uses float16 and torch.amp.GradScaler's dynamic loss
scaling (tricks: its LossScaler); `--channels-last` converts model and input to channels_last. On a GPU,
cuDNN's benchmark mode is on, as in tricks.

`--compile [MODE]` runs the steps through torch.compile(model, mode=MODE) (TorchInductor; modes
default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs); the optimizer stays eager, as
in timm's train.py --torchcompile. The first training and the first evaluation step compile;
their time is `first_steps_s` (for eager runs, the same two steps' time), outside the timed steps.

`--data DIR --workers N` trains on real JPEGs instead of the fixed batch (inference stays on
it): torchvision's ImageFolder over DIR/train with its reference classification preset
(RandomResizedCrop(size) bilinear + antialias, horizontal flip, PILToTensor, float, ImageNet
normalisation) through DataLoader(num_workers=N, pin_memory on a GPU, shuffle, drop_last,
persistent workers), each batch copied to the device non_blocking: what keeps a GPU fed in
torchvision's references. The timed steps then include waiting for the loader; the JSON adds
"data" and "workers" (bench/gpu_loader.sh compares it with the synthetic batch).

Prints one JSON line per model:
  {"impl":"pytorch","model":...,"batch":...,"size":...,"precision":...,"channels_last":...,
   "device":...,"compile":null|MODE,"first_steps_s":...,"train_img_s":...,"infer_img_s":...,
   "ops_per_train_step":...,"ops_per_infer_step":..., "threads":..., "steps":..., "warmup":...}
   (the op counts are null when compiled)

  .venv/bin/python bench/pytorch_bench.py --model cifar_resnet20 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = {  # model -> (batch, size, num_classes)
    "cifar_resnet20": (128, 32, 10),
    "cifar_resnet56": (128, 32, 10),
    "resnet50d": (16, 224, 1000),
    "resnet50": (16, 224, 1000),
    "resnet18": (128, 224, 1000),
    "airbench94": (1024, 32, 10),
    "resnext50_32x4d": (16, 224, 1000),
    "seresnet50": (16, 224, 1000),
    "seresnext50_32x4d": (16, 224, 1000),
}
# Built by timm (the models whose parameter names and logits tests/parity.rs checks tricks' against).
TIMM_MODELS = ("resnet50d", "resnext50_32x4d", "seresnet50", "seresnext50_32x4d")


class CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al. 2016, section 4.2: depth 6n+2, widths 16/32/64, projection shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        assert (depth - 2) % 6 == 0, depth
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(CifarBasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    """torchvision/timm ResNet-50 bottleneck (the paper's ResNet-B: stride on the 3x3 conv)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 (basic blocks, projection shortcuts); with `cifar_stem` a 3x3
    stride-1 stem conv and no max-pool, as tricks' `model.cifar_stem`."""

    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False):
        super().__init__()
        self.cifar_stem = cifar_stem
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) if cifar_stem else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            blocks = []
            for j in range(2):
                blocks.append(CifarBasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet50(nn.Module):
    """Plain-PyTorch ResNet-50 (same layers as torchvision's), for machines without timm."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, (width, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name: str, num_classes: int, cifar_stem: bool = False) -> nn.Module:
    if cifar_stem and name != "resnet18":
        raise SystemExit("--cifar-stem: only for resnet18 here")
    if name == "resnet18":
        return ResNet18(num_classes, cifar_stem)
    if name == "resnet50":
        return ResNet50(num_classes)
    if name == "cifar_resnet20":
        return CifarResNet(20, num_classes)
    if name == "cifar_resnet56":
        return CifarResNet(56, num_classes)
    if name == "airbench94":
        # The transcription tests/parity.rs checks against tricks' network (scripts/parity.py);
        # its whitening conv is not trained, as in airbench94 and in tricks.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        from parity import airbench94_net

        net = airbench94_net(num_classes)
        net[0].weight.requires_grad = False
        return net
    if name in TIMM_MODELS:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(DEFAULTS)}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_ops(step) -> int:
    """Outermost operator calls of one `step()`, on every thread, as `tricks bench` counts them
    (its `count_ops`, a RecordFunction observer in csrc/shim.cpp): each ATen operator called
    from outside any other, and each node the autograd engine evaluates (the operators inside it
    do not count again). Python annotations (the optimizer's step) are not calls; the operators
    inside them count. On a GPU each counted call is at least one kernel launch."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    def is_call(e) -> bool:
        return e.name.startswith(("aten::", "autograd::engine::evaluate_function:"))

    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    n = 0
    for e in prof.events():
        if not is_call(e):
            continue
        parent = e.cpu_parent
        while parent is not None and not is_call(parent):
            parent = parent.cpu_parent
        n += parent is None
    return n


def measure(args, name: str) -> dict:
    batch, size, num_classes = DEFAULTS[name]
    if args.cifar_stem:
        size, num_classes = 32, 10
    batch = args.batch or batch
    size = args.size or size
    device = torch.device(args.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    if device.type == "cuda":
        # tricks autotunes cuDNN's convolution algorithms on a GPU: the reference does the same.
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build(name, num_classes, args.cifar_stem).to(device=device, memory_format=fmt)
    # The module the steps call: compiled by TorchInductor with --compile (the model only, as
    # timm's train.py --torchcompile and torchvision's references do; the optimizer stays eager).
    net = torch.compile(model, mode=None if args.compile == "default" else args.compile) if args.compile else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    batches = real_batches(args, batch, size, device, fmt) if args.data else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)

    # f16 trains through the dynamic loss scaler, as tricks does.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def train_step():
        inputs, targets = next(batches) if batches else (x, y)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(net(inputs), targets)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer_step():
        with autocast():
            net(x)

    def timed(step, n_warmup, n_steps):
        for _ in range(n_warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        sync(device)
        return batch * n_steps / (time.perf_counter() - t0)

    if args.lockstep:
        return lockstep(model, train_step, infer_step, args.warmup, device)

    # With --compile the first call of each mode compiles (training and evaluation are separate
    # graphs); its time is reported as compile_s and left out of the timed steps.
    def first(step) -> float:
        t0 = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - t0

    model.train()
    compile_s = first(train_step)
    train_img_s = timed(train_step, args.warmup, args.steps)
    # Compiled steps run Inductor's fused kernels, not one ATen operator per layer: not counted.
    train_ops = None if args.compile or args.data else count_ops(train_step)
    model.eval()
    with torch.no_grad():
        compile_s += first(infer_step)
        infer_img_s = timed(infer_step, args.warmup, args.steps)
        infer_ops = None if args.compile else count_ops(infer_step)

    return {
        "impl": "pytorch",
        "model": name,
        "cifar_stem": bool(args.cifar_stem),
        "batch": batch,
        "size": size,
        "precision": args.precision,
        "loss_scaling": scaler.is_enabled(),
        "channels_last": bool(args.channels_last),
        "device": args.device,
        "compile": args.compile or None,
        "first_steps_s": round(compile_s, 2),
        "train_img_s": round(train_img_s, 2),
        "infer_img_s": round(infer_img_s, 2),
        "ops_per_train_step": train_ops,
        "ops_per_infer_step": infer_ops,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "cudnn_benchmark": device.type == "cuda" and torch.backends.cudnn.benchmark,
        "data": args.data or None,
        "workers": args.workers if args.data else None,
    }


def real_batches(args, batch: int, size: int, device, fmt):
    """Endless training batches from torchvision's ImageFolder + DataLoader (--data)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    preset = T.Compose([
        T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(Path(args.data) / "train"), transform=preset)
    if len(dataset) < batch:
        sys.exit(f"--data {args.data}: {len(dataset)} training images, fewer than one batch of {batch}")
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    while True:
        for images, labels in loader:
            yield (images.to(device, non_blocking=True).contiguous(memory_format=fmt),
                   labels.to(device, non_blocking=True))


def lockstep(model, train_step, infer_step, warmup: int, device) -> dict:
    """--lockstep, for bench/lockstep.py (the protocol of `tricks bench --lockstep`): after the
    warm-up prints `ready`, then for each line of stdin, `train` or `infer`, takes one step and
    prints its milliseconds; the end of input ends it."""

    def train():
        model.train()
        train_step()

    def infer():
        model.eval()
        with torch.no_grad():
            infer_step()

    for _ in range(warmup):
        train()
        infer()
    sync(device)
    print("ready", flush=True)
    for line in sys.stdin:
        step = {"train": train, "infer": infer}.get(line.strip())
        if step is None:
            raise SystemExit(f"lockstep: unknown command {line.strip()!r} (train or infer)")
        t0 = time.perf_counter()
        step()
        sync(device)
        print(f"{1e3 * (time.perf_counter() - t0):.3f}", flush=True)
    return {"impl": "pytorch", "lockstep": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", help="comma-separated, or 'all': " + ", ".join(DEFAULTS))
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: per model)")
    ap.add_argument("--size", type=int, default=0, help="image side in px (default: per model)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cifar-stem", action="store_true", help="resnet18 with the full-resolution stem, 32 px, 10 classes")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (train and inference each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    ap.add_argument("--compile", nargs="?", const="default", default="",
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                    help="torch.compile the model with this Inductor mode (bare --compile: default); "
                         "the first train and eval steps compile and are reported as first_steps_s")
    ap.add_argument("--data", default="", help="train on DIR/train's JPEGs through torchvision's DataLoader")
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers with --data")
    ap.add_argument("--lockstep", action="store_true",
                    help="after the warm-up, take one step per line of stdin (train or infer) and print its ms "
                         "(bench/lockstep.py; one model only)")
    args = ap.parse_args()

    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = list(DEFAULTS) if args.model == "all" else [m for m in args.model.split(",") if m]
    for name in models:
        if name not in DEFAULTS:
            ap.error(f"unknown model {name!r}; known: {', '.join(DEFAULTS)}")
    if args.lockstep and len(models) != 1:
        ap.error("--lockstep takes one model")
    if args.data and (args.lockstep or args.compile):
        ap.error("--data times eager training steps: not with --lockstep or --compile")
    for name in models:
        print(json.dumps(measure(args, name)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
