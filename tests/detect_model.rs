//! The Faster R-CNN + FPN model against torchvision 0.26's.
//!
//! * Evaluation parity: `fasterrcnn_resnet50_fpn(num_classes=4, min_size=192, max_size=288)`
//!   with a fixed seed, its batch-norm statistics randomised and its objectness and class
//!   weights scaled up (so that scores spread and detections survive the 0.05 threshold), loaded
//!   by name; on two images of different sizes (neither side a multiple of 32) the RPN's
//!   proposals (same count, boxes to 1e-4) and the final boxes, scores and labels (1e-4), as
//!   sets (near-ties may swap places).
//! * Training parity with no randomness: torchvision's `FasterRCNN` on
//!   `_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)` with sampler batch
//!   sizes above every candidate set and positive fractions of 1, so that both samplers take
//!   everything, on the same images resized to a shorter side of 128 (passed per image); the
//!   trainable set, the four losses and a few named gradients, in f64 on both sides, to 1e-9. (In f32 the losses agree to 3e-7 and the head's gradients to 2e-5, but the
//!   backbone's only to 5e-4–3e-3 of their norm: this random network amplifies rounding, and
//!   torchvision's own f32 gradients differ from its f64 ones by 6e-5–2e-4.)
//! * A ResNet-18-D backbone: names, shapes, the trainable set for `trainable_layers` 0/3/5,
//!   and SGD steps on one image that reduce the loss.
//!
//! The Python side (one script, run once, shared by the two parity tests) needs torch,
//! torchvision and safetensors; without them the parity tests print why and pass, unless
//! `TRICKS_REQUIRE_PARITY=1`.

mod common;

use common::{python, skip_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use tch::{nn, Device, Kind, Tensor};
use tricks::config::ModelConfig;
use tricks::detect::model::anchors::generate_anchors;
use tricks::detect::model::sampling::{BalancedPositiveNegativeSampler, Matcher};
use tricks::detect::model::transform::resized_size;
use tricks::detect::model::{
    freeze_backbone, load_torchvision, FasterRcnn, FasterRcnnOptions, Target,
};
use tricks::model::ModelSpec;

const MIN_SIZE: i64 = 192;
const MAX_SIZE: i64 = 288;
/// The shorter side in the training parity (passed per image, as multi-scale training does).
const TRAIN_MIN_SIZE: i64 = 128;
/// Relative tolerance of the training parity (in f64; measured: 1e-15).
const LOSS_TOLERANCE: f64 = 1e-9;
/// Parameters whose gradients the training parity compares.
const GRADIENTS: [&str; 7] = [
    "rpn.head.conv.0.0.weight",
    "rpn.head.cls_logits.weight",
    "roi_heads.box_head.fc6.weight",
    "rpn.head.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
    "backbone.fpn.layer_blocks.0.0.weight",
    "backbone.body.layer4.2.conv3.weight",
];

const SCRIPT: &str = r#"
import sys, torch
from safetensors.torch import save_file
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
out, MIN, MAX, TRAIN_MIN = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
GRADIENTS = sys.argv[5].split(",")
torch.manual_seed(0)
model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=MIN, max_size=MAX)
def image(h, w):
    # Smooth colour noise with a few flat rectangles: regions that differ, so proposals do.
    im = torch.nn.functional.interpolate(torch.rand(1, 3, h // 16 + 1, w // 16 + 1), size=(h, w), mode="bilinear")[0]
    for _ in range(6):
        y, x = torch.randint(0, h - 40, ()).item(), torch.randint(0, w - 40, ()).item()
        im[:, y:y + torch.randint(20, 120, ()).item(), x:x + torch.randint(20, 120, ()).item()] = torch.rand(3, 1, 1)
    return im
images = [image(190, 250), image(300, 221)]
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 1.5)
    # Pyramid features of about unit size (the random backbone's are in the hundreds), then
    # objectness and class logits far from their ties at initialisation.
    for block in model.backbone.fpn.layer_blocks:
        block[0].weight.mul_(0.002)
    model.rpn.head.cls_logits.weight.mul_(40.0)
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.mul_(30.0)
    predictor.bbox_pred.weight.mul_(5.0)
model.eval()
captured = {}
model.transform.register_forward_hook(lambda mod, inp, outp: captured.update(sizes=outp[0].image_sizes))
model.rpn.register_forward_hook(lambda mod, inp, outp: captured.update(proposals=outp[0]))
model.roi_heads.box_head.register_forward_hook(lambda mod, inp, outp: captured.update(fc7=outp))
with torch.no_grad():
    model(images)
    # Centre the class logits over these images' proposals, or one class takes every box; then
    # finish the forward pass from the box head's output (what a second call would compute).
    predictor.cls_score.bias.copy_(-(predictor.cls_score.weight @ captured["fc7"].mean(0)))
    class_logits, box_regression = predictor(captured["fc7"])
    boxes, scores, labels = model.roi_heads.postprocess_detections(
        class_logits, box_regression, captured["proposals"], captured["sizes"])
    detections = model.transform.postprocess(
        [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)],
        captured["sizes"], [tuple(im.shape[-2:]) for im in images])
state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
save_file(state, f"{out}/weights.safetensors")
io = {f"image.{i}": im for i, im in enumerate(images)}
for i, d in enumerate(detections):
    io[f"proposals.{i}"] = captured["proposals"][i].contiguous()
    for k in ("boxes", "scores", "labels"):
        io[f"{k}.{i}"] = d[k].contiguous()
targets = [
    {"boxes": torch.tensor([[20.5, 30.25, 120.75, 150.5], [100.2, 40.7, 180.3, 95.9]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.tensor([[10.1, 12.3, 60.7, 200.9], [150.4, 160.6, 215.2, 290.8], [30.3, 30.9, 90.2, 77.7]]), "labels": torch.tensor([2, 2, 1])},
]
for i, t in enumerate(targets):
    io[f"target.boxes.{i}"] = t["boxes"]; io[f"target.labels.{i}"] = t["labels"]
big = 10**7
train_model = FasterRCNN(
    _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=4, min_size=TRAIN_MIN, max_size=MAX,
    rpn_batch_size_per_image=big, rpn_positive_fraction=1.0, box_batch_size_per_image=big, box_positive_fraction=1.0)
train_model.load_state_dict(state)
train_model.train()
# In f64: the random network amplifies f32 rounding (torchvision's own f32 gradients differ from
# its f64 ones by up to 2e-4 of their norm), which would hide a real difference.
train_model.double()
losses = train_model([im.double() for im in images], [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets])
sum(losses.values()).backward()
for k, v in losses.items():
    io[k] = v.detach().reshape(1)
params = dict(train_model.named_parameters())
for name in GRADIENTS:
    io[f"grad.{name}"] = params[name].grad.contiguous()
io["trainable_count"] = torch.tensor([sum(1 for p in train_model.parameters() if p.requires_grad)])
save_file(io, f"{out}/io.safetensors")
"#;

/// The reference's output folder, made once per test process; `None` when it cannot run (the
/// reason is printed by [`reference`]).
fn reference() -> Option<&'static Path> {
    static DIR: OnceLock<Result<tempfile::TempDir, String>> = OnceLock::new();
    let made = DIR.get_or_init(|| {
        let py = python();
        if !py.exists() {
            return Err(format!("no python at {}", py.display()));
        }
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new(&py)
            .arg("-c")
            .arg(SCRIPT)
            .arg(dir.path())
            .arg(MIN_SIZE.to_string())
            .arg(MAX_SIZE.to_string())
            .arg(TRAIN_MIN_SIZE.to_string())
            .arg(GRADIENTS.join(","))
            .output()
            .unwrap();
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("ModuleNotFoundError") {
                return Err(format!(
                    "a python package is missing: {}",
                    err.lines().last().unwrap_or("")
                ));
            }
            panic!("the torchvision script failed:\n{err}");
        }
        Ok(dir)
    });
    match made {
        Ok(dir) => Some(dir.path()),
        Err(why) => {
            skip_reference("Faster R-CNN parity", why);
            None
        }
    }
}

fn spec(name: &str, variant: &str) -> ModelSpec {
    ModelSpec::from_config(&ModelConfig {
        name: name.into(),
        variant: variant.into(),
        ..Default::default()
    })
    .unwrap()
}

/// torchvision's settings of both reference models.
fn reference_options() -> FasterRcnnOptions {
    FasterRcnnOptions {
        min_size: MIN_SIZE,
        max_size: MAX_SIZE,
        rpn_batch_size_per_image: 10_000_000,
        rpn_positive_fraction: 1.0,
        box_batch_size_per_image: 10_000_000,
        box_positive_fraction: 1.0,
        ..Default::default()
    }
}

/// The ResNet-50-FPN with the reference's weights, and its input/output tensors.
fn reference_model(dir: &Path) -> (nn::VarStore, FasterRcnn, BTreeMap<String, Tensor>) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model =
        FasterRcnn::new(&vs.root(), &spec("resnet50", "b"), 4, reference_options()).unwrap();
    load_torchvision(&mut vs, &dir.join("weights.safetensors")).unwrap();
    let io = tricks::checkpoint::load(&dir.join("io.safetensors"))
        .unwrap()
        .tensors;
    (vs, model, io)
}

/// max |a − b| / (1 + max |b|): 1e-4 means 1e-4 absolute on small values and relative on
/// large ones (box coordinates in the hundreds of pixels).
fn error(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    if b.numel() == 0 {
        return 0.0;
    }
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).abs().max().double_value(&[]) / (1.0 + b.abs().max().double_value(&[]))
}

/// The reference boxes in the order of `ours` (`[n]` indices into `theirs`): each of our boxes
/// has a reference box within 1e-4 (as [`error`]) and no two share one. Boxes are compared as
/// sets because two of nearly equal score may come out in either order: rounding differs with
/// the summation order (measured: with libtorch on one thread against the reference's two, two
/// pairs of proposals swapped places; nothing else changed).
fn match_boxes(ours: &Tensor, theirs: &Tensor, what: &str) -> Tensor {
    assert_eq!(ours.size(), theirs.size(), "{what}: count");
    let n = ours.size()[0];
    if n == 0 {
        return Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    }
    let scale = 1.0 + theirs.abs().max().double_value(&[]);
    let distance = (ours.unsqueeze(1) - theirs.unsqueeze(0))
        .abs()
        .amax([2i64].as_slice(), false);
    let (nearest_distance, nearest) = distance.min_dim(1, false);
    let (worst, box_index) = nearest_distance.max_dim(0, false);
    let err = worst.double_value(&[]) / scale;
    assert!(
        err < 1e-4,
        "{what}: box {} is {err} (relative) from the nearest reference box",
        box_index.int64_value(&[])
    );
    let indices: Vec<i64> = Vec::try_from(&nearest).unwrap();
    let mut taken = vec![false; n as usize];
    for &j in &indices {
        assert!(
            !taken[j as usize],
            "{what}: two boxes match reference box {j}"
        );
        taken[j as usize] = true;
    }
    nearest
}

#[test]
fn eval_proposals_and_detections_match_torchvision() {
    let Some(dir) = reference() else { return };
    let (_vs, model, io) = reference_model(dir);
    let images = [io["image.0"].shallow_clone(), io["image.1"].shallow_clone()];
    let (proposals, detections) = tch::no_grad(|| model.detect_with_proposals(&images));
    for (i, (p, d)) in proposals.iter().zip(&detections).enumerate() {
        let _ = match_boxes(
            p,
            &io[&format!("proposals.{i}")],
            &format!("image {i}: proposals"),
        );
        let expected_boxes = &io[&format!("boxes.{i}")];
        assert!(
            expected_boxes.size()[0] >= 20,
            "image {i}: the reference should keep many detections, kept {}",
            expected_boxes.size()[0]
        );
        let order = match_boxes(&d.boxes, expected_boxes, &format!("image {i}: detections"));
        let expected_scores = io[&format!("scores.{i}")].index_select(0, &order);
        let err = error(&d.scores, &expected_scores);
        assert!(err < 1e-4, "image {i}: scores differ by {err}");
        assert!(
            d.labels
                .equal(&io[&format!("labels.{i}")].index_select(0, &order)),
            "image {i}: labels differ"
        );
        // Boxes are in the original image's coordinates.
        let (h, w) = (images[i].size()[1] as f64, images[i].size()[2] as f64);
        assert!(d.boxes.narrow(1, 2, 1).max().double_value(&[]) <= w + 1e-3);
        assert!(d.boxes.narrow(1, 3, 1).max().double_value(&[]) <= h + 1e-3);
    }
}

#[test]
fn training_losses_and_gradients_match_torchvision_without_sampling() {
    let Some(dir) = reference() else { return };
    let (mut vs, model, io) = reference_model(dir);
    vs.double();
    let opts = reference_options();
    freeze_backbone(&vs, &opts);
    let trainable = vs
        .variables()
        .values()
        .filter(|v| v.requires_grad())
        .count() as i64;
    assert_eq!(trainable, io["trainable_count"].int64_value(&[0]));
    let images = [
        io["image.0"].to_kind(Kind::Double),
        io["image.1"].to_kind(Kind::Double),
    ];
    let targets: Vec<Target> = (0..2)
        .map(|i| Target {
            boxes: io[&format!("target.boxes.{i}")].to_kind(Kind::Double),
            labels: io[&format!("target.labels.{i}")].shallow_clone(),
        })
        .collect();
    let mut rngs = [0, 1].map(ChaCha8Rng::seed_from_u64);
    let losses = model.losses(&images, &[TRAIN_MIN_SIZE; 2], &targets, &mut rngs);
    for (name, loss) in [
        ("loss_objectness", &losses.objectness),
        ("loss_rpn_box_reg", &losses.rpn_box_reg),
        ("loss_classifier", &losses.classifier),
        ("loss_box_reg", &losses.box_reg),
    ] {
        let expected = io[name].double_value(&[0]);
        let got = loss.double_value(&[]);
        assert!(
            (got - expected).abs() <= LOSS_TOLERANCE * expected.abs(),
            "{name}: {got} vs torchvision's {expected}"
        );
    }
    losses.total().backward();
    let variables = vs.variables();
    for name in GRADIENTS {
        let grad = variables[name].grad();
        let expected = &io[&format!("grad.{name}")];
        let err = (&grad - expected).norm().double_value(&[]) / expected.norm().double_value(&[]);
        assert!(
            err < LOSS_TOLERANCE,
            "{name}: gradient differs by {err} of its norm"
        );
    }
    // Frozen: the first stages and every batch norm of the backbone.
    for name in [
        "backbone.body.layer1.0.conv1.weight",
        "backbone.body.layer4.0.bn1.weight",
    ] {
        assert!(!variables[name].requires_grad(), "{name} should be frozen");
    }
}

/// Overwrites every variable with a draw from a seeded generator (libtorch's own generator is
/// shared by the tests running in parallel): weights normal with std √(1/fan_in), biases and
/// batch-norm shifts and means 0, batch-norm scales and variances 1.
fn deterministic_init(vs: &nn::VarStore, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    tch::no_grad(|| {
        for (name, mut v) in variables {
            let size = v.size();
            let value = if size.len() > 1 {
                let fan_in: i64 = size[1..].iter().product();
                let std = (1.0 / fan_in as f64).sqrt();
                let n: i64 = size.iter().product();
                let draws: Vec<f32> = (0..n)
                    .map(|_| (rng.sample::<f64, _>(rand_distr::StandardNormal) * std) as f32)
                    .collect();
                Tensor::from_slice(&draws).view(size.as_slice())
            } else if name.ends_with("running_var") || is_bn_scale(&name, &size, vs) {
                Tensor::ones(size.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::zeros(size.as_slice(), (Kind::Float, Device::Cpu))
            };
            v.copy_(&value);
        }
    });
}

/// Whether `name` is a batch norm's γ (a 1-D `weight` beside a `running_mean`).
fn is_bn_scale(name: &str, size: &[i64], vs: &nn::VarStore) -> bool {
    size.len() == 1
        && name
            .strip_suffix(".weight")
            .is_some_and(|m| vs.variables().contains_key(&format!("{m}.running_mean")))
}

/// An image of `h`×`w` with a bright, striped rectangle at `(x1, y1, x2, y2)` on a dark
/// gradient.
fn image_with_box(h: i64, w: i64, b: [i64; 4]) -> Tensor {
    let mut v = Vec::with_capacity((3 * h * w) as usize);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let inside = x >= b[0] && x < b[2] && y >= b[1] && y < b[3];
                let value = if inside {
                    0.6 + 0.3 * (((x / 4 + c) % 2) as f32)
                } else {
                    0.1 + 0.2 * (x + y) as f32 / (h + w) as f32
                };
                v.push(value);
            }
        }
    }
    Tensor::from_slice(&v).view([3, h, w])
}

#[test]
fn resnet18d_backbone_names_trainable_sets_and_sgd_steps() {
    let vs = nn::VarStore::new(Device::Cpu);
    let opts = FasterRcnnOptions {
        min_size: 128,
        max_size: 128,
        ..Default::default()
    };
    let model = FasterRcnn::new(&vs.root(), &spec("resnet18", "d"), 3, opts.clone()).unwrap();
    deterministic_init(&vs, 0);
    let shapes: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect();
    for (name, shape) in [
        ("backbone.body.conv1.0.weight", vec![32, 3, 3, 3]),
        ("backbone.body.conv1.1.running_var", vec![32]),
        (
            "backbone.body.layer2.0.downsample.1.weight",
            vec![128, 64, 1, 1],
        ),
        ("backbone.body.layer4.1.bn2.bias", vec![512]),
        ("backbone.fpn.inner_blocks.0.0.weight", vec![256, 64, 1, 1]),
        ("backbone.fpn.inner_blocks.3.0.bias", vec![256]),
        ("backbone.fpn.layer_blocks.2.0.weight", vec![256, 256, 3, 3]),
        ("rpn.head.conv.0.0.weight", vec![256, 256, 3, 3]),
        ("rpn.head.cls_logits.weight", vec![3, 256, 1, 1]),
        ("rpn.head.bbox_pred.bias", vec![12]),
        ("roi_heads.box_head.fc6.weight", vec![1024, 256 * 7 * 7]),
        ("roi_heads.box_head.fc7.bias", vec![1024]),
        ("roi_heads.box_predictor.cls_score.weight", vec![3, 1024]),
        ("roi_heads.box_predictor.bbox_pred.weight", vec![12, 1024]),
    ] {
        assert_eq!(shapes.get(name), Some(&shape), "{name}");
    }
    assert!(!shapes
        .keys()
        .any(|k| k.contains("fc.") || k.starts_with("backbone.body.fc")));

    // The trainable backbone tensors for trainable_layers 0, 3, 5 (frozen BN), 5 (trained BN).
    let trainable_body = |trainable_layers, frozen_bn| {
        freeze_backbone(
            &vs,
            &FasterRcnnOptions {
                trainable_layers,
                frozen_bn,
                ..Default::default()
            },
        );
        let mut names: Vec<String> = vs
            .variables()
            .into_iter()
            .filter(|(k, v)| k.starts_with("backbone.body.") && v.requires_grad())
            .map(|(k, _)| k)
            .collect();
        names.sort();
        names
    };
    assert!(trainable_body(0, true).is_empty());
    let three = trainable_body(3, true);
    assert!(three.iter().all(|k| k.starts_with("backbone.body.layer2")
        || k.starts_with("backbone.body.layer3")
        || k.starts_with("backbone.body.layer4")));
    // ResNet-18-D, layers 2–4: 2 blocks × 2 convs each, plus the first block's shortcut conv.
    assert_eq!(three.len(), 3 * 5, "{three:?}");
    assert!(three.iter().all(|k| !k.contains("bn")));
    let five = trainable_body(5, true);
    // All 20 convs: the deep stem's three, 16 in blocks, 3 shortcut convs.
    assert_eq!(five.len(), 3 + 16 + 3, "{five:?}");
    let five_bn = trainable_body(5, false);
    assert!(five_bn.contains(&"backbone.body.bn1.weight".to_string()));
    assert!(five_bn.contains(&"backbone.body.conv1.1.bias".to_string()));
    // The heads always train.
    assert!(vs.variables()["rpn.head.conv.0.0.weight"].requires_grad());

    // SGD on one image with one box: the loss falls. The sampler draws the same anchors and
    // proposals at every step (same seed), so the loss moves with the weights only.
    freeze_backbone(&vs, &FasterRcnnOptions::default());
    let image = image_with_box(100, 120, [30, 20, 90, 70]);
    let target = || Target {
        boxes: Tensor::from_slice(&[30.0f32, 20.0, 90.0, 70.0]).view([1, 4]),
        labels: Tensor::from_slice(&[2i64]),
    };
    let sgd = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = nn::OptimizerConfig::build(sgd, &vs, 0.005).unwrap();
    let (mut totals, mut objectness, mut first) = (Vec::new(), Vec::new(), None);
    for _ in 0..6 {
        let mut rngs = [ChaCha8Rng::seed_from_u64(1)];
        let losses = model.losses(
            &[image.shallow_clone()],
            &[opts.min_size],
            &[target()],
            &mut rngs,
        );
        let total = losses.total();
        totals.push(total.double_value(&[]));
        objectness.push(losses.objectness.double_value(&[]));
        first.get_or_insert_with(|| losses.classifier.double_value(&[]));
        opt.backward_step(&total);
    }
    eprintln!("total losses {totals:?}, objectness {objectness:?}");
    // Fresh heads: objectness near ln 2 (logits near 0), three classes near ln 3. Measured:
    // 0.645, 1.104; total 1.883 → 0.227 after 5 steps, objectness falling at every step.
    assert!((objectness[0] - 2f64.ln()).abs() < 0.1, "{objectness:?}");
    assert!((first.unwrap() - 3f64.ln()).abs() < 0.05, "{first:?}");
    assert!(
        objectness.windows(2).all(|w| w[1] < w[0]),
        "the RPN's loss should fall at every step: {objectness:?}"
    );
    assert!(
        totals[5] < 0.25 * totals[0],
        "5 SGD steps should cut the loss by 4: {totals:?}"
    );

    // An image without boxes: only background, so no box losses.
    let empty = Target {
        boxes: Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
        labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
    };
    let mut rngs = [ChaCha8Rng::seed_from_u64(2)];
    let losses =
        tch::no_grad(|| model.losses(&[image.shallow_clone()], &[128], &[empty], &mut rngs));
    assert_eq!(losses.rpn_box_reg.double_value(&[]), 0.0);
    assert_eq!(losses.box_reg.double_value(&[]), 0.0);
    assert!(losses.objectness.double_value(&[]) > 0.0 && losses.classifier.double_value(&[]) > 0.0);
    // Detections come in the image's own coordinates, with foreground labels.
    let detections = tch::no_grad(|| model.detect(&[image.shallow_clone()]));
    assert_eq!(detections.len(), 1);
    let d = &detections[0];
    let n = d.boxes.size()[0];
    assert!(n <= 100 && d.scores.size() == [n] && d.labels.size() == [n]);
    if n > 0 {
        assert!(d.boxes.narrow(1, 2, 1).max().double_value(&[]) <= 120.0);
        assert!(d.boxes.narrow(1, 3, 1).max().double_value(&[]) <= 100.0);
        assert!(d.labels.min().int64_value(&[]) >= 1 && d.labels.max().int64_value(&[]) <= 2);
        assert!(d.scores.min().double_value(&[]) > 0.05);
    }
}

#[test]
fn cell_anchors_and_resize_follow_torchvision() {
    // torchvision's cell anchors for size 32, ratios (0.5, 1, 2): rounded half to even.
    let anchors = generate_anchors(&[32.0], &[0.5, 1.0, 2.0]);
    let expected = Tensor::from_slice(&[
        -23f32, -11., 23., 11., -16., -16., 16., 16., -11., -23., 11., 23.,
    ])
    .view([3, 4]);
    assert!(anchors.equal(&expected), "{anchors}");
    // Shorter side to 800 unless the longer would pass 1333; floor of side × scale.
    assert_eq!(resized_size(480, 640, 800, 1333), (800, 1066));
    assert_eq!(resized_size(300, 1200, 800, 1333), (333, 1333));
    assert_eq!(resized_size(190, 250, 256, 384), (256, 336));
}

#[test]
fn matcher_and_sampler_follow_torchvision() {
    // 2 ground truths × 4 predictions.
    let iou = Tensor::from_slice(&[0.9f32, 0.5, 0.1, 0.0, 0.2, 0.6, 0.25, 0.0]).view([2, 4]);
    let strict = Matcher::new(0.7, 0.3, false).call(&iou);
    assert_eq!(Vec::<i64>::try_from(&strict).unwrap(), [0, -2, -1, -1]);
    // Low-quality matches: gt 1's best prediction (1, IoU 0.6) gets it back.
    let rpn = Matcher::new(0.7, 0.3, true).call(&iou);
    assert_eq!(Vec::<i64>::try_from(&rpn).unwrap(), [0, 1, -1, -1]);

    let labels = Tensor::from_slice(&[1i64, 0, 0, -1, 2, 0, 0, 0, 1, 0]);
    let sampler = BalancedPositiveNegativeSampler {
        batch_size_per_image: 4,
        positive_fraction: 0.25,
    };
    let draw = |seed| {
        let (pos, neg) = sampler.sample(&labels, &mut ChaCha8Rng::seed_from_u64(seed));
        (
            Vec::<bool>::try_from(&pos).unwrap(),
            Vec::<bool>::try_from(&neg).unwrap(),
        )
    };
    let (pos, neg) = draw(3);
    assert_eq!(pos.iter().filter(|&&p| p).count(), 1);
    assert_eq!(neg.iter().filter(|&&n| n).count(), 3);
    for i in 0..labels.size()[0] as usize {
        let label = labels.int64_value(&[i as i64]);
        assert!(!pos[i] || label >= 1, "positive {i} has label {label}");
        assert!(!neg[i] || label == 0, "negative {i} has label {label}");
    }
    assert_eq!(draw(3), (pos, neg), "the same seed draws the same");
    let differs = (4..20).any(|seed| draw(seed) != draw(3));
    assert!(differs, "other seeds should draw other samples");
}

#[test]
fn bad_backbones_and_weights_are_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let err = FasterRcnn::new(
        &vs.root(),
        &spec("cifar_resnet20", "a"),
        3,
        Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("CIFAR"), "{err}");
    let err =
        FasterRcnn::new(&vs.root(), &spec("resnet18", "a"), 1, Default::default()).unwrap_err();
    assert!(err.to_string().contains("num_classes"), "{err}");
    let opts = FasterRcnnOptions {
        trainable_layers: 6,
        ..Default::default()
    };
    let err = FasterRcnn::new(&vs.root(), &spec("resnet18", "a"), 3, opts).unwrap_err();
    assert!(err.to_string().contains("trainable_layers"), "{err}");

    // Weights of a 3-class model into a 5-class one: the mismatch is named.
    let dir = tempfile::tempdir().unwrap();
    let three = nn::VarStore::new(Device::Cpu);
    let _m = FasterRcnn::new(&three.root(), &spec("resnet18", "a"), 3, Default::default()).unwrap();
    let path = dir.path().join("three.safetensors");
    three.save(&path).unwrap();
    let mut five = nn::VarStore::new(Device::Cpu);
    let _m = FasterRcnn::new(&five.root(), &spec("resnet18", "a"), 5, Default::default()).unwrap();
    let err = format!("{:#}", load_torchvision(&mut five, &path).unwrap_err());
    assert!(err.contains("roi_heads.box_predictor.bbox_pred"), "{err}");
    // A ResNet-18 checkpoint into a ResNet-34: the missing tensors are named.
    let mut other = nn::VarStore::new(Device::Cpu);
    let _m = FasterRcnn::new(&other.root(), &spec("resnet34", "a"), 3, Default::default()).unwrap();
    let err = format!("{:#}", load_torchvision(&mut other, &path).unwrap_err());
    assert!(
        err.contains("missing") && err.contains("backbone.body.layer"),
        "{err}"
    );
}

const SPEED_SCRIPT: &str = r#"
import sys, time, torch, torchvision.models as models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
arch, classes, min_size, max_size, batch, threads = sys.argv[1], *map(int, sys.argv[2:])
if threads > 0: torch.set_num_threads(threads)
torch.manual_seed(0)
backbone = getattr(models, arch)(norm_layer=FrozenBatchNorm2d)
model = FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=classes, min_size=min_size, max_size=max_size)
images = [torch.rand(3, 480, 640) for _ in range(batch)]
boxes = torch.tensor([[50.0, 60.0, 250.0, 300.0], [300.0, 100.0, 420.0, 380.0], [400.0, 20.0, 630.0, 200.0]])
targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 9])} for _ in images]
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
def train():
    model.train(); loss = sum(model(images, targets).values()); opt.zero_grad(); loss.backward(); opt.step()
def evaluate():
    model.eval()
    with torch.no_grad(): model(images)
for name, f in (("eval", evaluate), ("train", train)):
    f()
    times = []
    for _ in range(3):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    print(f"torchvision {name}: {min(times):.2f} s (best of {times})")
"#;

/// One training step (forward, backward, SGD with momentum) and one evaluation forward of
/// Faster R-CNN + FPN on `arch` (variant B: torchvision's ResNet) over `batch` random 480×640
/// images resized to `min_size`, here and in torchvision built the same way, the best of three
/// after a warm-up each. `TRICKS_SPEED_THREADS` sets both sides' thread count (default: the
/// libraries' own).
fn speed_against_torchvision(arch: &str, classes: i64, min_size: i64, max_size: i64, batch: i64) {
    let threads: i64 = std::env::var("TRICKS_SPEED_THREADS")
        .map(|t| t.parse().expect("TRICKS_SPEED_THREADS: a number"))
        .unwrap_or(0);
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let opts = FasterRcnnOptions {
        min_size,
        max_size,
        ..Default::default()
    };
    let model = FasterRcnn::new(&vs.root(), &spec(arch, "b"), classes, opts.clone()).unwrap();
    freeze_backbone(&vs, &opts);
    let images: Vec<Tensor> = (0..batch)
        .map(|_| Tensor::rand([3, 480, 640], (Kind::Float, Device::Cpu)))
        .collect();
    let boxes = Tensor::from_slice(&[
        50.0f32, 60., 250., 300., 300., 100., 420., 380., 400., 20., 630., 200.,
    ])
    .view([3, 4]);
    let targets: Vec<Target> = (0..batch)
        .map(|_| Target {
            boxes: boxes.copy(),
            labels: Tensor::from_slice(&[1i64, 5, 9]),
        })
        .collect();
    let sgd = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = nn::OptimizerConfig::build(sgd, &vs, 0.01).unwrap();
    let mut rngs: Vec<ChaCha8Rng> = (0..batch as u64).map(ChaCha8Rng::seed_from_u64).collect();
    let sizes = vec![min_size; batch as usize];
    let mut train = || {
        let losses = model.losses(&images, &sizes, &targets, &mut rngs);
        opt.backward_step(&losses.total());
    };
    let best = |f: &mut dyn FnMut()| {
        f();
        let times: Vec<f64> = (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        (times.iter().copied().fold(f64::INFINITY, f64::min), times)
    };
    let (eval_s, eval_times) = best(&mut || {
        tch::no_grad(|| model.detect(&images));
    });
    println!("tricks eval: {eval_s:.2} s (best of {eval_times:?})");
    let (train_s, train_times) = best(&mut train);
    println!("tricks train: {train_s:.2} s (best of {train_times:?})");
    let o = Command::new(python())
        .arg("-c")
        .arg(SPEED_SCRIPT)
        .args([arch.to_string(), classes.to_string()])
        .args([min_size, max_size, batch, threads].map(|v| v.to_string()))
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&o.stdout));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Not a test: ResNet-50-FPN at min_size 512, two images, 91 classes (COCO's). Run with
/// `cargo test --release --test detect_model speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_resnet50_fpn() {
    speed_against_torchvision("resnet50", 91, 512, 853, 2);
}

/// Not a test: the coco128 recipe's sizes (`configs/coco128/fasterrcnn_resnet18d.toml`):
/// ResNet-18-FPN at min_size 320 (max 512), four images, 81 classes.
#[test]
#[ignore]
fn speed_coco128_recipe() {
    speed_against_torchvision("resnet18", 81, 320, 512, 4);
}
