//! The tricks beyond the paper against their references from the venv: CutMix against timm's
//! `Mixup` (same λ and box → the same mixed batch and targets), and its draws over a run.

mod common;

use common::{python, skip_reference};
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
    let py = python();
    if !py.exists() {
        skip_reference("CutMix against timm", "no Python venv");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("timm");
    let o = Command::new(&py)
        .arg("-c")
        .arg(TIMM_CUTMIX)
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("No module named") {
        skip_reference("CutMix against timm", &err);
        return;
    }
    assert!(o.status.success(), "{err}");
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
fn a_run_with_cutmix_and_mixup_trains_and_repeats_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::image_folder(&data, 3, 8, 2, 16);
    let cfg = common::tiny_config(
        tmp.path(),
        &data,
        2,
        "[mixup]\nalpha = 0.2\nprob = 0.9\nswitch_prob = 0.5\n[cutmix]\nalpha = 1.0\n",
    );
    let out = tmp.path().join("run");
    common::train(&cfg, &out, &[]);
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
    common::train(&cfg, &again, &[]);
    common::assert_same_weights(&out, &again, 2);
}
