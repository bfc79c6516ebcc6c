//! The tricks beyond the paper against their references from the venv: CutMix against timm's
//! `Mixup` (same λ and box → the same mixed batch and targets), and its draws over a run.

mod common;

use common::{python, reference, skip_reference};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use tricks::train::mixup::{cutmix, cutmix_box, CutBox, Mixup};

/// timm's `Mixup(cutmix_alpha=1.0)` in batch mode on a fixed batch, for several numpy seeds:
/// the mixed images and targets, and the raw λ and box centre it drew (re-drawn from the same
/// seed in the order timm draws them), with and without timm's label smoothing.
const TIMM_CUTMIX: &str = r#"
import json, sys
import numpy as np, torch
from safetensors.torch import save_file
from timm.data.mixup import Mixup, mixup_target
out = sys.argv[1]
torch.manual_seed(0)
x = torch.rand(6, 3, 13, 17)
y = torch.tensor([0, 1, 2, 3, 1, 0])
tensors = {"x": x}
cases = []
for i, (seed, smoothing, alpha) in enumerate([(1, 0.0, 1.0), (2, 0.0, 1.0), (3, 0.1, 1.0), (4, 0.0, 0.3), (5, 0.1, 2.0), (6, 0.0, 1.0)]):
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=alpha, label_smoothing=smoothing, num_classes=4)
    np.random.seed(seed)
    xm, ym = m(x.clone(), y)
    np.random.seed(seed)
    lam, use_cutmix = m._params_per_batch()
    assert use_cutmix
    cy, cx = int(np.random.randint(0, 13)), int(np.random.randint(0, 17))
    np.random.seed(seed)
    m._params_per_batch()
    from timm.data.mixup import cutmix_bbox_and_lam
    (yl, yh, xl, xh), lam_c = cutmix_bbox_and_lam(x.shape, lam)
    tensors[f"xm{i}"] = xm
    tensors[f"ym{i}"] = ym
    tensors[f"y1_{i}"] = mixup_target(y, 4, 1.0, smoothing)
    cases.append({"lam": lam, "cy": cy, "cx": cx, "box": [int(yl), int(yh), int(xl), int(xh)], "lam_corrected": float(lam_c)})
save_file(tensors, out + ".safetensors")
json.dump(cases, open(out + ".json", "w"))
"#;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn cutmix_gives_timms_box_batch_and_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("timm");
    if !reference("CutMix against timm", TIMM_CUTMIX, &out) {
        return;
    }
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(out.with_extension("safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    let x = &tensors["x"];
    // timm pairs each example with the batch reversed.
    let flip: Vec<i64> = (0..6).rev().collect();
    let mut empty_or_partial = 0;
    for (i, c) in cases.iter().enumerate() {
        let lam = c["lam"].as_f64().unwrap();
        let (cy, cx) = (c["cy"].as_i64().unwrap(), c["cx"].as_i64().unwrap());
        let (b, lam_c) = cutmix_box(13, 17, lam, cy, cx);
        let want: Vec<i64> = serde_json::from_value(c["box"].clone()).unwrap();
        assert_eq!(
            vec![b.y0, b.y1, b.x0, b.x1],
            want,
            "case {i}: λ {lam}, centre ({cy}, {cx})"
        );
        assert!(
            (lam_c - c["lam_corrected"].as_f64().unwrap()).abs() < 1e-12,
            "case {i}"
        );
        if b.y0 == 0 || b.x0 == 0 || b.y1 == 13 || b.x1 == 17 || lam_c == 1.0 {
            empty_or_partial += 1;
        }
        let (xm, ym) = cutmix(x, &tensors[&format!("y1_{i}")], lam_c, &flip, b);
        assert_eq!(
            max_diff(&xm, &tensors[&format!("xm{i}")]),
            0.0,
            "case {i}: images"
        );
        let d = max_diff(&ym, &tensors[&format!("ym{i}")]);
        assert!(d < 1e-7, "case {i}: targets differ by {d}");
    }
    // The cases include boxes clipped by a border, where the λ correction matters.
    assert!(empty_or_partial > 0);
}

#[test]
fn cutmix_pastes_only_inside_the_box_and_targets_follow_the_area() {
    let x = Tensor::arange(40, (Kind::Float, Device::Cpu)).view([2, 1, 4, 5]);
    let y = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
    let b = CutBox {
        y0: 1,
        y1: 3,
        x0: 2,
        x1: 5,
    };
    let lam = 1.0 - 6.0 / 20.0;
    let (xm, ym) = cutmix(&x, &y, lam, &[1, 0], b);
    let xs = Vec::<f32>::try_from(xm.flatten(0, -1)).unwrap();
    for n in 0..2usize {
        for r in 0..4usize {
            for c in 0..5usize {
                let inside = (1..3).contains(&r) && (2..5).contains(&c);
                let src = if inside { 1 - n } else { n };
                assert_eq!(xs[n * 20 + r * 5 + c], (src * 20 + r * 5 + c) as f32);
            }
        }
    }
    let ys = Vec::<f32>::try_from(ym.flatten(0, -1)).unwrap();
    assert!(
        (ys[0] - 0.7).abs() < 1e-6 && (ys[1] - 0.3).abs() < 1e-6,
        "{ys:?}"
    );
    // λ = 1: an empty box, the batch as it was.
    let (b1, l1) = cutmix_box(4, 5, 1.0, 2, 2);
    assert_eq!((b1.y1 - b1.y0) * (b1.x1 - b1.x0), 0);
    assert_eq!(l1, 1.0);
}

#[test]
fn mixing_draws_follow_prob_and_switch_prob_and_replay_per_step() {
    let mut cfg = tricks::config::Config::default();
    cfg.train.epochs = 10;
    cfg.mixup.alpha = 0.2;
    cfg.cutmix.alpha = 1.0;
    cfg.mixup.prob = 0.8;
    cfg.mixup.switch_prob = 0.25;
    let m = Mixup::from_config(&cfg).unwrap();
    let (mut mixed, mut cut) = (0, 0);
    let n = 4000;
    for step in 0..n {
        let d = m.draw(1, step, 8, 32, 32);
        assert_eq!(d, m.draw(1, step, 8, 32, 32), "a step's draws replay");
        if let Some(d) = d {
            mixed += 1;
            if let Some(b) = d.cut {
                cut += 1;
                let area = ((b.y1 - b.y0) * (b.x1 - b.x0)) as f64;
                assert!((d.lambda - (1.0 - area / 1024.0)).abs() < 1e-12);
            }
            let mut p = d.perm.clone();
            p.sort();
            assert_eq!(p, (0..8).collect::<Vec<i64>>());
        }
    }
    let mixed_share = mixed as f64 / n as f64;
    let cut_share = cut as f64 / mixed as f64;
    assert!((mixed_share - 0.8).abs() < 0.03, "mixed {mixed_share}");
    assert!((cut_share - 0.25).abs() < 0.03, "cutmix {cut_share}");
    // Mixup alone with prob 1 draws as before CutMix existed: every batch, no box.
    cfg.cutmix.alpha = 0.0;
    cfg.mixup.prob = 1.0;
    let m = Mixup::from_config(&cfg).unwrap();
    assert!((0..100).all(|s| m.draw(1, s, 8, 32, 32).is_some_and(|d| d.cut.is_none())));
}

#[test]
fn cutmix_keys_are_validated_by_name() {
    use tricks::config::Config;
    for (toml, key) in [
        ("[cutmix]\nalpha = -1.0\n", "cutmix.alpha"),
        ("[mixup]\nprob = 1.5\n", "mixup.prob"),
        ("[mixup]\nswitch_prob = -0.1\n", "mixup.switch_prob"),
        ("[cutmix]\nalhpa = 1.0\n", "alhpa"),
    ] {
        let err = format!("{:#}", Config::from_toml_str(toml, &[]).unwrap_err());
        assert!(err.contains(key), "{toml}: {err}");
    }
    let c = Config::from_toml_str("[cutmix]\nalpha = 1.0\n[mixup]\nprob = 0.0\n", &[]).unwrap();
    assert!(c.warnings().iter().any(|w| w.contains("mixup.prob")));
    let seg = "task = \"segmentation\"\n[segment]\nnum_classes = 3\n[cutmix]\nalpha = 1.0\n";
    let err = Config::from_toml_str(seg, &[])
        .map_err(|e| format!("{e:#}"))
        .and_then(|c| tricks::segment::validate_config(&c).map_err(|e| format!("{e:#}")));
    assert!(
        err.as_ref().is_err_and(|e| e.contains("cutmix.alpha")),
        "{err:?}"
    );
}

#[test]
fn a_run_with_lamb_cutmix_mixup_bce_and_erasing_trains_and_repeats_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::image_folder(&data, 3, 8, 2, 16);
    let cfg = common::tiny_config(
        tmp.path(),
        &data,
        2,
        "name = \"lamb\"\nweight_decay = 0.02\n\
         [mixup]\nalpha = 0.2\nprob = 0.9\nswitch_prob = 0.5\n[cutmix]\nalpha = 1.0\n\
         [loss]\nname = \"bce\"\nbce_target_threshold = 0.2\n",
    );
    let out = tmp.path().join("run");
    let erase = ["--set", "data.erase_prob=0.5"];
    common::train(&cfg, &out, &erase);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    for l in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["train_loss"].as_f64().unwrap().is_finite(), "{l}");
    }
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        saved.contains("[cutmix]") && saved.contains("switch_prob = 0.5"),
        "{saved}"
    );
    // The same run again gives the same weights: CutMix's draws are functions of (seed, step).
    let again = tmp.path().join("again");
    common::train(&cfg, &again, &erase);
    common::assert_same_weights(&out, &again, 2);
}

/// timm's `ModelEmaV3` (warm-up on, decay 0.99) over a conv + batch-norm model whose weights and
/// statistics take a random walk: the live state before each update and the average after it.
const TIMM_EMA: &str = r#"
import sys, torch
from safetensors.torch import save_file
from timm.utils.model_ema import ModelEmaV3
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
ema = ModelEmaV3(model, decay=0.99, use_warmup=True, warmup_gamma=1.0, warmup_power=2 / 3)
out = {}
for step in range(1, 41):
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.1)
    ema.update(model, step=step)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            out[f"live{step}.{k}"] = v.clone()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            out[f"ema{step}.{k}"] = v.clone()
save_file(out, sys.argv[1])
"#;

#[test]
fn ema_follows_timms_model_ema_v3_update_by_update() {
    use tricks::config::EmaConfig;
    use tricks::train::ema::{Ema, PREFIX};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ema.safetensors");
    if !reference("EMA against timm", TIMM_EMA, &path) {
        return;
    }
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    let names = [
        "0.weight",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    ];
    let vs = tch::nn::VarStore::new(Device::Cpu);
    for n in names {
        let (layer, var) = n.split_once('.').unwrap();
        let _ = (vs.root() / layer).zeros(var, &t[&format!("live1.{n}")].size());
    }
    let vars = vs.variables();
    let cfg = EmaConfig {
        decay: 0.99,
        ..EmaConfig::default()
    };
    let mut ema = Ema::new(&vs, &cfg);
    let mut worst = 0f64;
    for step in 1..=40 {
        tch::no_grad(|| {
            for n in names {
                vars[n]
                    .shallow_clone()
                    .copy_(&t[&format!("live{step}.{n}")]);
            }
        });
        ema.after_step(step);
        let state: std::collections::HashMap<String, Tensor> =
            ema.state_tensors().into_iter().collect();
        for n in names {
            let d = max_diff(
                &state[&format!("{PREFIX}{n}")],
                &t[&format!("ema{step}.{n}")],
            );
            worst = worst.max(d);
        }
    }
    assert!(worst <= 1e-7, "EMA differs from timm's by {worst}");
    // The warm-up: 0 at the first update (the average starts at the live weights), then
    // 1 − (1 + u)^(−2/3) up to the decay.
    assert_eq!(ema.decay_at(1), 0.0);
    assert!((ema.decay_at(2) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-15);
    assert_eq!(ema.decay_at(100_000), 0.99);
    // `ema.every = 2`: the same updates, on every second step, counted in updates.
    let mut every2 = Ema::new(
        &vs,
        &EmaConfig {
            every: 2,
            ..cfg.clone()
        },
    );
    let mut by_hand = Ema::new(&vs, &cfg);
    for step in 1..=6 {
        every2.after_step(step);
        if step % 2 == 0 {
            by_hand.after_step(step / 2);
        }
    }
    for ((_, a), (_, b)) in every2.state_tensors().iter().zip(by_hand.state_tensors()) {
        assert!(a.equal(&b));
    }
}

#[test]
fn a_run_with_ema_and_adamw_reports_both_evaluations_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::image_folder(&data, 3, 8, 2, 16);
    let cfg = common::tiny_config(
        tmp.path(),
        &data,
        3,
        "name = \"adamw\"\nweight_decay = 0.05\n[ema]\ndecay = 0.9\n",
    );
    let straight = tmp.path().join("straight");
    let lr = ["--set", "optim.lr=0.002"];
    common::train(
        &cfg,
        &straight,
        &["--set", "train.keep_checkpoints=3", lr[0], lr[1]],
    );
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let e = &l["ema"];
        for key in ["val_top1", "val_top5", "val_loss"] {
            assert!(e[key].as_f64().is_some(), "{key} missing: {l}");
        }
        assert!(l["val_top1"].as_f64().is_some());
    }
    // The averaged weights differ from the live ones, and best.safetensors holds the average of
    // its epoch (ema.use_for_best): its evaluation gives the EMA's top-1 of that epoch.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("summary.json")).unwrap())
            .unwrap();
    let best_epoch = summary["best_epoch"].as_u64().unwrap() as usize;
    let best_ema = lines[best_epoch - 1]["ema"]["val_top1"].as_f64().unwrap();
    assert_eq!(
        summary["best_top1"].as_f64().unwrap(),
        best_ema,
        "{summary}"
    );
    let o = common::run(&[
        "eval",
        "--checkpoint",
        straight.join("best.safetensors").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        common::stdout(&o).contains(&format!("{best_ema:.2}")),
        "eval of best.safetensors: {} (EMA top-1 {best_ema})",
        common::stdout(&o)
    );
    let ckpt = tricks::checkpoint::load(&tricks::checkpoint::epoch_checkpoint_path(
        &straight.join("checkpoints"),
        best_epoch,
    ))
    .unwrap();
    let best = tricks::checkpoint::load(&straight.join("best.safetensors")).unwrap();
    let avg = &ckpt.tensors["optim.ema.fc.weight"];
    assert!(!avg.equal(&ckpt.tensors["fc.weight"]));
    assert!(best.tensors["fc.weight"].equal(avg));
    assert!(!best.tensors.keys().any(|k| k.starts_with("optim.")));
    // Stopped mid-way through epoch 2 (after 4 steps of 3 per epoch), then resumed: the same
    // weights and average at the end, bit for bit.
    let resumed = tmp.path().join("resumed");
    common::train(
        &cfg,
        &resumed,
        &["--set", "train.max_steps=4", lr[0], lr[1]],
    );
    let o = common::run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
        "--resume",
        lr[0],
        lr[1],
    ]);
    assert!(
        o.status.success() && common::stderr(&o).contains("resuming from"),
        "{}",
        common::stderr(&o)
    );
    common::assert_same_weights(&straight, &resumed, 3);
}

/// timm's `BinaryCrossEntropy` on soft targets (with and without its target threshold) and on
/// hard labels, for fixed logits.
const TIMM_BCE: &str = r#"
import json, sys, torch
from safetensors.torch import save_file
from timm.loss import BinaryCrossEntropy
torch.manual_seed(0)
x = torch.randn(5, 7) * 3
q = torch.softmax(torch.randn(5, 7) * 2, dim=1)
y = torch.randint(0, 7, (5,))
save_file({"x": x, "q": q, "y": y}, sys.argv[1] + ".safetensors")
json.dump({
    "soft": BinaryCrossEntropy(smoothing=0.0)(x, q).item(),
    "threshold": BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)(x, q).item(),
    "hard": BinaryCrossEntropy(smoothing=0.0)(x, y).item(),
}, open(sys.argv[1] + ".json", "w"))
"#;

#[test]
fn bce_equals_timms_binary_cross_entropy() {
    use tricks::config::{Config, LossName};
    use tricks::train::loss::Criterion;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bce");
    if !reference("BCE against timm", TIMM_BCE, &out) {
        return;
    }
    let t: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(out.with_extension("safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    let (x, q, y) = (&t["x"], &t["q"], &t["y"]);
    let mut cfg = Config::default();
    cfg.loss.name = LossName::Bce;
    let loss = |cfg: &Config, targets: Option<&Tensor>| {
        f64::try_from(Criterion::from_config(cfg, 7).loss(x, y, targets, None)).unwrap()
    };
    let close = |got: f64, key: &str| {
        let w = want[key].as_f64().unwrap();
        assert!((got - w).abs() < 1e-6, "{key}: {got} against timm's {w}");
    };
    close(loss(&cfg, Some(q)), "soft");
    let hard = Criterion::from_config(&cfg, 7).targets(y, false);
    assert!(
        hard.is_some(),
        "BCE needs dense targets also without mixing"
    );
    close(loss(&cfg, hard.as_ref()), "hard");
    cfg.loss.bce_target_threshold = Some(0.2);
    close(loss(&cfg, Some(q)), "threshold");
    // Keys: the threshold only with BCE, never with a teacher.
    for (toml, key) in [
        (
            "[loss]\nbce_target_threshold = 0.2\n",
            "bce_target_threshold",
        ),
        (
            "[loss]\nname = \"bce\"\n[distill]\nteacher = \"t.safetensors\"\n",
            "distill.teacher",
        ),
        ("[loss]\nname = \"focal\"\n", "focal"),
    ] {
        let err = format!("{:#}", Config::from_toml_str(toml, &[]).unwrap_err());
        assert!(err.contains(key), "{toml}: {err}");
    }
}

/// `torch.optim.AdamW` and timm's `Lamb`, three steps each on fixed gradients, with the no-bias-
/// decay grouping (1-D tensors without weight decay); LAMB's gradients are large enough for its
/// global-norm clip to act.
const TORCH_OPTIMISERS: &str = r#"
import sys, torch
from safetensors.torch import save_file
from timm.optim import Lamb
torch.manual_seed(0)
shapes = {"conv.weight": (4, 3, 3, 3), "bn.weight": (4,), "bn.bias": (4,), "fc.weight": (5, 4)}
init = {k: torch.randn(s) * 0.5 for k, s in shapes.items()}
grads = [{k: torch.randn(s) for k, s in shapes.items()} for _ in range(3)]
out = {f"init.{k}": v for k, v in init.items()}
for step, g in enumerate(grads):
    out.update({f"grad{step}.{k}": v for k, v in g.items()})
for name in ("adamw", "lamb"):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    groups = [
        {"params": [p for k, p in params.items() if p.dim() > 1], "weight_decay": 0.05},
        {"params": [p for k, p in params.items() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01) if name == "adamw" else Lamb(groups, lr=0.01)
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone() * (1.0 if name == "adamw" else 3.0)
        opt.step()
    out.update({f"{name}.{k}": p.detach().clone() for k, p in params.items()})
save_file(out, sys.argv[1])
"#;

#[test]
fn adamw_and_lamb_step_as_torch_and_timm() {
    use tricks::config::{OptimConfig, OptimName};
    use tricks::train::optim::Optimizer;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("opt.safetensors");
    if !reference(
        "AdamW / LAMB against PyTorch and timm",
        TORCH_OPTIMISERS,
        &path,
    ) {
        return;
    }
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    let names = ["conv.weight", "bn.weight", "bn.bias", "fc.weight"];
    for (name, rule, grad_scale) in [
        ("adamw", OptimName::AdamW, 1.0),
        ("lamb", OptimName::Lamb, 3.0),
    ] {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        for n in names {
            let (layer, var) = n.split_once('.').unwrap();
            let _ = (vs.root() / layer).var_copy(var, &t[&format!("init.{n}")]);
        }
        let cfg = OptimConfig {
            name: rule,
            weight_decay: 0.05,
            no_bias_decay: true,
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&vs, &cfg);
        opt.flatten();
        let vars = vs.variables();
        for step in 0..3 {
            opt.zero_grad();
            let loss = names
                .iter()
                .map(|n| {
                    (&vars[*n] * (&t[&format!("grad{step}.{n}")] * grad_scale)).sum(Kind::Float)
                })
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
            loss.backward();
            opt.step(0.01);
        }
        assert_eq!(opt.adam_steps(), Some(3));
        for n in names {
            let d = max_diff(&vars[n], &t[&format!("{name}.{n}")]);
            assert!(d < 1e-6, "{name} {n}: differs from the reference by {d}");
        }
        // The state round-trips through a checkpoint's tensors.
        let state: std::collections::BTreeMap<String, Tensor> =
            opt.state_tensors().into_iter().collect();
        assert!(
            state.contains_key("optim.exp_avg_sq.fc.weight")
                && state.contains_key("optim.adam_steps")
        );
        let mut again = Optimizer::new(&vs, &cfg);
        again.load_state(&state).unwrap();
        assert_eq!(again.adam_steps(), Some(3));
    }
}

#[test]
fn drop_path_keeps_whole_samples_at_the_keep_rate_and_rescales_them() {
    use tricks::model::StepDraws;
    let draws = StepDraws::default();
    draws.set(7);
    let x = Tensor::ones([20_000, 2, 3, 3], (Kind::Float, Device::Cpu));
    let y = draws.drop(&x, 0.3, 4, 18);
    let per_sample = y.view([20_000, 18]);
    let first = per_sample.select(1, 0);
    // Every element of a sample shares its sample's draw.
    assert_eq!(
        max_diff(&per_sample, &first.unsqueeze(1).expand([20_000, 18], false)),
        0.0
    );
    let kept = f64::try_from(first.gt(0.0).to_kind(Kind::Double).mean(Kind::Double)).unwrap();
    assert!((kept - 0.7).abs() < 0.012, "kept {kept}");
    let scale = f64::try_from(first.max()).unwrap();
    assert!(
        (scale - 1.0 / 0.7).abs() < 1e-6,
        "survivors scaled by {scale}"
    );
    // The expectation is unchanged.
    let mean = f64::try_from(y.mean(Kind::Double)).unwrap();
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    // A function of the seed and the site.
    assert!(y.equal(&draws.drop(&x, 0.3, 4, 18)));
    assert!(!y.equal(&draws.drop(&x, 0.3, 5, 18)));
    draws.set(8);
    assert!(!y.equal(&draws.drop(&x, 0.3, 4, 18)));
    // Dropout: one draw per element.
    let d = draws.drop(&x, 0.5, 0, 1).view([-1]);
    let zeros = f64::try_from(d.eq(0.0).to_kind(Kind::Double).mean(Kind::Double)).unwrap();
    assert!((zeros - 0.5).abs() < 0.01, "dropped {zeros}");
}

#[test]
fn drop_path_rates_rise_as_timms_and_only_training_draws() {
    use tricks::config::ModelConfig;
    use tricks::model::{ModelSpec, ResNet};
    let cfg = ModelConfig {
        name: "resnet50".into(),
        variant: "d".into(),
        drop_path: 0.1,
        drop_rate: 0.25,
        ..ModelConfig::default()
    };
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), &ModelSpec::from_config(&cfg).unwrap(), 10);
    let rates = net.drop_path_rates();
    assert_eq!(rates.len(), 16);
    let py = python();
    if py.exists() {
        let o = Command::new(&py)
            .arg("-c")
            .arg(
                "import timm, json\nm = timm.create_model('resnet50d', drop_path_rate=0.1, drop_rate=0.25)\n\
                 print(json.dumps([b.drop_path.drop_prob if b.drop_path is not None else 0.0 \
                 for l in (m.layer1, m.layer2, m.layer3, m.layer4) for b in l]))",
            )
            .output()
            .unwrap();
        if o.status.success() {
            let timm: Vec<f64> = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(timm.len(), rates.len());
            for (a, b) in rates.iter().zip(&timm) {
                assert!((a - b).abs() < 1e-12, "{rates:?} against timm's {timm:?}");
            }
        } else {
            skip_reference(
                "drop-path rates against timm",
                &String::from_utf8_lossy(&o.stderr),
            );
        }
    }
    use tch::nn::ModuleT;
    let x = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let eval = tch::no_grad(|| net.forward_t(&x, false));
    assert!(eval.equal(&tch::no_grad(|| net.forward_t(&x, false))));
    net.set_draw_seed(1);
    let a = tch::no_grad(|| net.forward_t(&x, true));
    net.set_draw_seed(1);
    let b = tch::no_grad(|| net.forward_t(&x, true));
    net.set_draw_seed(2);
    let c = tch::no_grad(|| net.forward_t(&x, true));
    assert!(a.equal(&b), "the same seed draws the same masks");
    assert!(!a.equal(&c), "another seed draws other masks");
}

#[test]
fn random_erasing_draws_rectangles_as_timm_and_fills_them_with_unit_noise() {
    use rand::SeedableRng;
    use tricks::data::transforms::Erasing;
    let (h, w, n) = (32usize, 40usize, 8_000);
    let (area, aspect) = ([0.02, 1.0 / 3.0], [0.3, 1.0 / 0.3]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut fractions = Vec::with_capacity(n);
    let mut erased = 0usize;
    for _ in 0..n {
        let erasing = Erasing {
            p: 0.25,
            area,
            aspect,
        };
        match erasing.rect(h, w, &mut rng) {
            Some([top, left, eh, ew]) => {
                erased += 1;
                assert!(top + eh <= h && left + ew <= w && eh < h && ew < w);
                fractions.push((eh * ew) as f64 / (h * w) as f64);
            }
            None => fractions.push(0.0),
        }
    }
    let share = erased as f64 / n as f64;
    assert!((share - 0.25).abs() < 0.02, "erased {share} of the images");
    let mean = fractions.iter().sum::<f64>() / n as f64;
    // One image: the rectangle is noise, the rest untouched.
    let mut img = vec![5.0f32; 3 * h * w];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let one = Erasing {
        p: 1.0,
        area: [0.3, 0.3],
        aspect: [1.0, 1.0],
    };
    one.apply(&mut img, 3, h, w, &mut rng);
    let noise: Vec<f64> = img
        .iter()
        .filter(|&&v| v != 5.0)
        .map(|&v| v as f64)
        .collect();
    let expect = 3 * ((0.3 * (h * w) as f64).sqrt().round() as usize).pow(2);
    assert_eq!(noise.len(), expect);
    let m = noise.iter().sum::<f64>() / noise.len() as f64;
    let sd = (noise.iter().map(|v| (v - m).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
    assert!(
        m.abs() < 0.1 && (sd - 1.0).abs() < 0.1,
        "noise mean {m}, sd {sd}"
    );
    // timm's RandomErasing on the same shape: the mean erased fraction agrees (its draws come
    // from Python's generator, so only the distribution can be compared).
    let py = python();
    if !py.exists() {
        return skip_reference("random erasing against timm", "no Python venv");
    }
    let script = format!(
        "import torch, random\nfrom timm.data.random_erasing import RandomErasing\n\
         random.seed(0); torch.manual_seed(0)\n\
         re = RandomErasing(probability=0.25, mode='pixel', device='cpu')\n\
         tot = 0.0\nfor _ in range({n}):\n    x = torch.zeros(3, {h}, {w})\n    re(x)\n    tot += (x != 0).any(0).float().mean().item()\nprint(tot / {n})\n"
    );
    let o = Command::new(&py).arg("-c").arg(&script).output().unwrap();
    if !o.status.success() {
        return skip_reference(
            "random erasing against timm",
            &String::from_utf8_lossy(&o.stderr),
        );
    }
    let timm: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    // Each mean has a standard error of about 0.0011 at 8,000 images.
    assert!(
        (mean - timm).abs() < 0.005,
        "erased area {mean} against timm's {timm}"
    );
}
