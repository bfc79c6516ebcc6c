//! Detection ops (`tricks::detect::boxes`, `tricks::detect::roi_align`) against torchvision.
//!
//! The inputs are generated here (ChaCha8, fixed seed), written to one safetensors file with a
//! JSON list of the cases, and one Python process computes every torchvision reference (box
//! arithmetic, the box coder, nms, batched_nms, roi_align and its gradient); the tests compare.
//! Without python/torch/torchvision the comparisons print why and pass, unless
//! `TRICKS_REQUIRE_PARITY=1`. The other tests check known values and edge cases alone.
//!
//! `cargo test --release --test detect_ops -- --ignored --nocapture` times roi_align and nms
//! against torchvision on FPN-sized data (not part of the suite: about a minute).

mod common;

use common::{python, skip_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use tch::{Kind, Tensor};
use tricks::detect::boxes::{
    batched_nms, box_area, box_iou, clip_boxes_to_image, nms, nms_by_mask, remove_small_boxes,
    BoxCoder,
};
use tricks::detect::roi_align::roi_align;

/// Computes every case of `cases.json` with torchvision into `expected.safetensors`, the keys
/// `<case>.<output>`.
const REFERENCE_SCRIPT: &str = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
from torchvision.ops import boxes as B, roi_align
from torchvision.models.detection._utils import BoxCoder
d = sys.argv[1]
x = load_file(f"{d}/inputs.safetensors")
out = {}
for c in json.load(open(f"{d}/cases.json")):
    n, op = c["name"], c["op"]
    g = lambda k: x[f"{n}.{k}"]
    if op == "box_iou":
        out[f"{n}.iou"] = B.box_iou(g("boxes1"), g("boxes2"))
        out[f"{n}.area"] = B.box_area(g("boxes1"))
    elif op == "clip":
        out[f"{n}.clipped"] = B.clip_boxes_to_image(g("boxes"), (c["height"], c["width"]))
    elif op == "remove_small":
        out[f"{n}.keep"] = B.remove_small_boxes(g("boxes"), c["min_size"])
    elif op == "box_coder":
        coder = BoxCoder(tuple(c["weights"]))
        out[f"{n}.encoded"] = coder.encode_single(g("reference"), g("proposals"))
        out[f"{n}.decoded"] = coder.decode(g("rel_codes"), [g("boxes")])
    elif op == "nms":
        out[f"{n}.keep"] = B.nms(g("boxes"), g("scores"), c["iou_threshold"])
    elif op == "batched_nms":
        out[f"{n}.keep"] = B.batched_nms(g("boxes"), g("scores"), g("idxs"), c["iou_threshold"])
    elif op == "roi_align":
        inp = g("input").clone().requires_grad_(True)
        y = roi_align(inp, g("rois"), (c["oh"], c["ow"]), c["spatial_scale"], c["sampling_ratio"], c["aligned"])
        (y * g("grad_output")).sum().backward()
        out[f"{n}.output"] = y.detach()
        out[f"{n}.grad_input"] = inp.grad
    else:
        raise ValueError(f"unknown op {op} in case {n}")
save_file({k: v.contiguous() for k, v in out.items()}, f"{d}/expected.safetensors")
"#;

/// Random test data from a fixed seed.
struct Gen(ChaCha8Rng);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen(ChaCha8Rng::seed_from_u64(seed))
    }

    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.gen_range(lo..hi)).collect()
    }

    fn normal(&mut self, shape: &[i64]) -> Tensor {
        let n = shape.iter().product::<i64>() as usize;
        let v: Vec<f32> = (0..n).map(|_| self.0.sample(StandardNormal)).collect();
        Tensor::from_slice(&v).view(shape)
    }

    /// `n` boxes with corners in `[lo, hi)` and sides in `(0.5, max_side)`: `[n, 4]`.
    fn boxes(&mut self, n: usize, lo: f32, hi: f32, max_side: f32) -> Tensor {
        let v: Vec<f32> = (0..n)
            .flat_map(|_| {
                let (x, y) = (self.0.gen_range(lo..hi), self.0.gen_range(lo..hi));
                let (w, h) = (
                    self.0.gen_range(0.5..max_side),
                    self.0.gen_range(0.5..max_side),
                );
                [x, y, x + w, y + h]
            })
            .collect();
        Tensor::from_slice(&v).view([n as i64, 4])
    }

    /// `n` scores drawn from `levels` distinct values (exact ties when `levels` is small).
    fn tied_scores(&mut self, n: usize, levels: u32) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|_| self.0.gen_range(0..levels) as f32 / levels as f32)
            .collect();
        Tensor::from_slice(&v)
    }

    fn classes(&mut self, n: usize, classes: i64) -> Tensor {
        let v: Vec<i64> = (0..n).map(|_| self.0.gen_range(0..classes)).collect();
        Tensor::from_slice(&v)
    }
}

/// The inputs of every reference case (`<case>.<input>`) and the case list for the script.
struct Cases {
    inputs: Vec<(String, Tensor)>,
    specs: Vec<Value>,
}

impl Cases {
    fn add(&mut self, spec: Value, inputs: Vec<(&str, Tensor)>) {
        let name = spec["name"].as_str().unwrap().to_string();
        for (key, t) in inputs {
            self.inputs.push((format!("{name}.{key}"), t));
        }
        self.specs.push(spec);
    }

    fn input(&self, case: &str, key: &str) -> &Tensor {
        let full = format!("{case}.{key}");
        &self
            .inputs
            .iter()
            .find(|(k, _)| *k == full)
            .unwrap_or_else(|| panic!("no input {full}"))
            .1
    }

    fn of_op<'a>(&'a self, op: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.specs.iter().filter(move |s| s["op"] == op)
    }
}

/// NMS boxes near the borders of a 100×80 image: corners beyond it clipped onto its edges.
fn border_boxes(g: &mut Gen, n: usize) -> Tensor {
    clip_boxes_to_image(&g.boxes(n, -30.0, 90.0, 50.0), 80, 100)
}

/// Pairs of boxes whose f32 IoU is exactly 0.5 (one inside the other at half its area) and
/// exactly f32(1/3) (two squares overlapping by half): the threshold's boundary.
fn boundary_boxes() -> Tensor {
    let v: Vec<f32> = vec![
        0.0, 0.0, 4.0, 1.0, //
        0.0, 0.0, 2.0, 1.0, //
        20.0, 0.0, 30.0, 10.0, //
        25.0, 0.0, 35.0, 10.0, //
        50.0, 0.0, 60.0, 10.0, //
        50.0, 0.0, 60.0, 10.0, //
    ];
    Tensor::from_slice(&v).view([6, 4])
}

fn build_cases() -> Cases {
    let mut g = Gen::new(20190621);
    let mut c = Cases {
        inputs: Vec::new(),
        specs: Vec::new(),
    };

    // Box arithmetic: random boxes, a degenerate (zero-width) one and an identical pair.
    let boxes1 = g.boxes(20, 0.0, 100.0, 50.0);
    let boxes2 = Tensor::cat(&[g.boxes(14, 0.0, 100.0, 50.0), boxes1.narrow(0, 3, 1)], 0);
    boxes1.get(5).get(2).copy_(&boxes1.get(5).get(0));
    c.add(
        json!({"name": "iou", "op": "box_iou"}),
        vec![("boxes1", boxes1), ("boxes2", boxes2)],
    );
    c.add(
        json!({"name": "clip_2d", "op": "clip", "height": 80, "width": 100}),
        vec![("boxes", g.boxes(30, -50.0, 120.0, 80.0))],
    );
    c.add(
        json!({"name": "clip_3d", "op": "clip", "height": 40, "width": 30}),
        vec![("boxes", g.boxes(24, -20.0, 50.0, 30.0).view([2, 12, 4]))],
    );
    // Sides exactly 5 (kept: the test is `>=`) among random ones.
    let small = Tensor::cat(
        &[
            g.boxes(30, 0.0, 50.0, 10.0),
            Tensor::from_slice(&[1.0f32, 1.0, 6.0, 6.0, 2.0, 2.0, 7.0, 7.0]).view([2, 4]),
        ],
        0,
    );
    c.add(
        json!({"name": "small", "op": "remove_small", "min_size": 5.0}),
        vec![("boxes", small)],
    );
    for (name, weights) in [
        ("coder_1", [1.0, 1.0, 1.0, 1.0]),
        ("coder_10", [10.0, 10.0, 5.0, 5.0]),
    ] {
        // Regressions up to ±30: beyond the exp clamp (ln(1000/16) ≈ 4.1) after either weights.
        let rel_codes = g.normal(&[40, 12]) * 2.0;
        let _ = rel_codes.narrow(0, 0, 4).fill_(30.0);
        c.add(
            json!({"name": name, "op": "box_coder", "weights": weights}),
            vec![
                ("reference", g.boxes(40, 0.0, 200.0, 100.0)),
                ("proposals", g.boxes(40, 0.0, 200.0, 100.0)),
                ("rel_codes", rel_codes),
                ("boxes", g.boxes(40, 0.0, 200.0, 100.0)),
            ],
        );
    }

    // NMS.
    let nms_cases: Vec<(&str, f64, Tensor, Tensor)> = vec![
        (
            "nms_random",
            0.5,
            g.boxes(300, 0.0, 200.0, 60.0),
            Tensor::from_slice(&g.uniform(300, 0.0, 1.0)),
        ),
        (
            "nms_borders",
            0.3,
            border_boxes(&mut g, 200),
            Tensor::from_slice(&g.uniform(200, 0.0, 1.0)),
        ),
        (
            "nms_ties",
            0.5,
            g.boxes(250, 0.0, 100.0, 40.0),
            g.tied_scores(250, 3),
        ),
        (
            "nms_identical",
            0.7,
            Tensor::cat(
                &[
                    g.boxes(1, 10.0, 20.0, 30.0).repeat([20, 1]),
                    g.boxes(30, 0.0, 60.0, 30.0),
                ],
                0,
            ),
            g.tied_scores(50, 4),
        ),
        (
            "nms_boundary_half",
            0.5,
            boundary_boxes(),
            Tensor::from_slice(&[0.9f32, 0.8, 0.7, 0.6, 0.5, 0.4]),
        ),
        (
            "nms_boundary_third",
            1.0 / 3.0,
            boundary_boxes(),
            Tensor::from_slice(&[0.9f32, 0.8, 0.7, 0.6, 0.5, 0.4]),
        ),
    ];
    for (name, iou_threshold, boxes, scores) in nms_cases {
        c.add(
            json!({"name": name, "op": "nms", "iou_threshold": iou_threshold}),
            vec![("boxes", boxes), ("scores", scores)],
        );
    }
    // batched_nms: below the CPU limit of 4000 coordinates (the offset trick, 1000 boxes is
    // exactly at it) and above (per class), with ties and boxes repeated across classes.
    for (name, n, classes) in [
        ("batched_200", 200, 5),
        ("batched_1000", 1000, 7),
        ("batched_1500", 1500, 12),
    ] {
        let base = g.boxes(n / 2, 0.0, 300.0, 80.0);
        let boxes = Tensor::cat(&[base.shallow_clone(), base], 0);
        c.add(
            json!({"name": name, "op": "batched_nms", "iou_threshold": 0.5}),
            vec![
                ("boxes", boxes),
                ("scores", g.tied_scores(n, 50)),
                ("idxs", g.classes(n, classes)),
            ],
        );
    }

    // roi_align on two 24×32 maps (image 48×64 at spatial scale 1/2): random RoIs of both
    // images in mixed order, RoIs over the borders, fully outside, tiny (below one pixel), large,
    // and inverted (x2 < x1); output 5×4 (not square, so that the axes cannot be swapped).
    let mut rois: Vec<f32> = Vec::new();
    for k in 0..24 {
        let (x, y) = (g.0.gen_range(-10.0f32..60.0), g.0.gen_range(-10.0f32..45.0));
        let (w, h) = (g.0.gen_range(1.0f32..40.0), g.0.gen_range(1.0f32..30.0));
        rois.extend([(k % 2) as f32, x, y, x + w, y + h]);
    }
    rois.extend([
        0.0, -20.0, -15.0, 10.0, 12.0, // over the top-left corner
        1.0, 50.0, 30.0, 90.0, 70.0, // over the bottom-right corner
        0.0, 80.0, 60.0, 120.0, 90.0, // fully outside (beyond W, H)
        1.0, -40.0, -40.0, -5.0, -4.0, // fully outside (before 0)
        1.0, 10.2, 11.7, 10.6, 11.9, // tiny
        0.0, 30.0, 20.0, 30.0, 20.0, // a point
        0.0, -2.0, -2.0, 66.0, 50.0, // the whole image and more
        1.0, 20.0, 30.0, 12.0, 25.0, // inverted
    ]);
    let rois = Tensor::from_slice(&rois).view([-1, 5]);
    let k = rois.size()[0];
    let input = g.normal(&[2, 3, 24, 32]);
    for sampling_ratio in [2, 0] {
        for aligned in [false, true] {
            let name = format!(
                "roi_sr{sampling_ratio}_{}",
                if aligned { "aligned" } else { "legacy" }
            );
            c.add(
                json!({"name": name, "op": "roi_align", "oh": 5, "ow": 4, "spatial_scale": 0.5,
                       "sampling_ratio": sampling_ratio, "aligned": aligned}),
                vec![
                    ("input", input.shallow_clone()),
                    ("rois", rois.shallow_clone()),
                    ("grad_output", g.normal(&[k, 3, 5, 4])),
                ],
            );
        }
    }
    // One-pixel-high and one-pixel-wide maps (no span to normalise by).
    for (name, shape) in [("roi_h1", [1, 2, 1, 9]), ("roi_w1", [1, 2, 7, 1])] {
        let rois = Tensor::from_slice(&[
            0.0f32, -1.0, -1.0, 6.0, 3.0, 0.0, 0.2, 0.0, 3.5, 0.8, 0.0, 2.0, -0.7, 9.5, 1.2,
        ])
        .view([3, 5]);
        c.add(
            json!({"name": name, "op": "roi_align", "oh": 2, "ow": 3, "spatial_scale": 1.0,
                   "sampling_ratio": 0, "aligned": false}),
            vec![
                ("input", g.normal(&shape)),
                ("rois", rois),
                ("grad_output", g.normal(&[3, 2, 2, 3])),
            ],
        );
    }
    // f64 on a larger map (in f32 the sampler's normalised coordinates would round by about
    // W · 6e-8 pixels): the semantics agree to rounding. FPN-like: stride 8, 7×7, adaptive.
    let rois64: Vec<f32> = (0..30)
        .flat_map(|_| {
            let (x, y) = (
                g.0.gen_range(-50.0f32..900.0),
                g.0.gen_range(-50.0f32..700.0),
            );
            let (w, h) = (g.0.gen_range(2.0f32..300.0), g.0.gen_range(2.0f32..300.0));
            [0.0, x, y, x + w, y + h]
        })
        .collect();
    for (name, sampling_ratio) in [("roi_f64_sr2", 2), ("roi_f64_adaptive", 0)] {
        c.add(
            json!({"name": name, "op": "roi_align", "oh": 7, "ow": 7, "spatial_scale": 0.125,
                   "sampling_ratio": sampling_ratio, "aligned": false}),
            vec![
                ("input", g.normal(&[1, 2, 100, 120]).to_kind(Kind::Double)),
                (
                    "rois",
                    Tensor::from_slice(&rois64)
                        .view([30, 5])
                        .to_kind(Kind::Double),
                ),
                (
                    "grad_output",
                    g.normal(&[30, 2, 7, 7]).to_kind(Kind::Double),
                ),
            ],
        );
    }
    c
}

/// Why a reference cannot be had: a missing interpreter or package (skip), or a failure.
enum NoReference {
    Missing(String),
    Failed(String),
}

/// The expected outputs (a safetensors file's bytes), computed once for all tests.
fn expected_bytes() -> &'static Result<Vec<u8>, NoReference> {
    static EXPECTED: OnceLock<Result<Vec<u8>, NoReference>> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let py = python();
        if !py.exists() {
            return Err(NoReference::Missing(format!(
                "no python at {}",
                py.display()
            )));
        }
        let dir = tempfile::tempdir().unwrap();
        let cases = build_cases();
        Tensor::write_safetensors(&cases.inputs, dir.path().join("inputs.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("cases.json"),
            Value::Array(cases.specs).to_string(),
        )
        .unwrap();
        let o = Command::new(&py)
            .arg("-c")
            .arg(REFERENCE_SCRIPT)
            .arg(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() {
            return Err(if err.contains("ModuleNotFoundError") {
                NoReference::Missing(format!(
                    "a python package is missing: {}",
                    err.lines().last().unwrap_or("")
                ))
            } else {
                NoReference::Failed(err)
            });
        }
        Ok(std::fs::read(dir.path().join("expected.safetensors")).unwrap())
    })
}

/// The torchvision outputs by key, or `None` (after saying why) when they cannot be computed.
fn expected(what: &str) -> Option<HashMap<String, Tensor>> {
    match expected_bytes() {
        Err(NoReference::Missing(why)) => {
            skip_reference(what, why);
            None
        }
        Err(NoReference::Failed(err)) => panic!("the torchvision reference script failed:\n{err}"),
        Ok(bytes) => {
            let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
            let tensors = file
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    let kind = match view.dtype() {
                        safetensors::Dtype::F32 => Kind::Float,
                        safetensors::Dtype::F64 => Kind::Double,
                        safetensors::Dtype::I64 => Kind::Int64,
                        other => panic!("{name}: unexpected dtype {other:?}"),
                    };
                    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    (name, Tensor::from_data_size(view.data(), &shape, kind))
                })
                .collect();
            Some(tensors)
        }
    }
}

fn get<'a>(expected: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    expected
        .get(key)
        .unwrap_or_else(|| panic!("the reference has no {key}"))
}

/// Largest absolute difference; shapes must agree and NaNs must sit at the same places.
fn max_abs_diff(what: &str, actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let (a, e) = (actual.to_kind(Kind::Double), expected.to_kind(Kind::Double));
    assert!(
        a.isnan().equal(&e.isnan()),
        "{what}: NaN at different places"
    );
    if a.numel() == 0 {
        return 0.0;
    }
    let diff = (a.nan_to_num(0.0, None, None) - e.nan_to_num(0.0, None, None)).abs();
    f64::try_from(diff.max()).unwrap()
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let diff = max_abs_diff(what, actual, expected);
    assert!(
        diff <= tolerance,
        "{what}: max |difference| {diff} > {tolerance}"
    );
}

/// The same indices in the same order; a failure shows the first difference, not the lists.
fn assert_same_indices(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.kind(), Kind::Int64, "{what}: indices must be i64");
    let (a, e) = (
        Vec::<i64>::try_from(actual).unwrap(),
        Vec::<i64>::try_from(expected).unwrap(),
    );
    if let Some(at) = (0..a.len().max(e.len())).find(|&i| a.get(i) != e.get(i)) {
        let window = |v: &[i64]| v[at.saturating_sub(2)..(at + 3).min(v.len())].to_vec();
        panic!(
            "{what}: {} kept indices, torchvision {}; first difference at position {at}: \
             ours ...{:?}..., torchvision's ...{:?}...",
            a.len(),
            e.len(),
            window(&a),
            window(&e)
        );
    }
}

#[test]
fn box_arithmetic_and_coder_match_torchvision() {
    let Some(expected) = expected("box ops against torchvision") else {
        return;
    };
    let cases = build_cases();
    let e = |key: &str| get(&expected, key);
    let iou = box_iou(cases.input("iou", "boxes1"), cases.input("iou", "boxes2"));
    assert_close("box_iou", &iou, e("iou.iou"), 1e-7);
    assert_close(
        "box_area",
        &box_area(cases.input("iou", "boxes1")),
        e("iou.area"),
        0.0,
    );
    for spec in cases.of_op("clip") {
        let name = spec["name"].as_str().unwrap();
        let clipped = clip_boxes_to_image(
            cases.input(name, "boxes"),
            spec["height"].as_i64().unwrap(),
            spec["width"].as_i64().unwrap(),
        );
        assert_close(name, &clipped, e(&format!("{name}.clipped")), 0.0);
    }
    let keep = remove_small_boxes(cases.input("small", "boxes"), 5.0);
    assert_same_indices("remove_small_boxes", &keep, e("small.keep"));
    assert!(Vec::<i64>::try_from(&keep).unwrap().ends_with(&[30, 31]));
    for spec in cases.of_op("box_coder") {
        let name = spec["name"].as_str().unwrap();
        let w: Vec<f64> = serde_json::from_value(spec["weights"].clone()).unwrap();
        let coder = BoxCoder::new([w[0], w[1], w[2], w[3]]);
        let encoded = coder.encode(
            cases.input(name, "reference"),
            cases.input(name, "proposals"),
        );
        assert_close(
            &format!("{name} encode"),
            &encoded,
            e(&format!("{name}.encoded")),
            1e-6,
        );
        let decoded = coder.decode(cases.input(name, "rel_codes"), cases.input(name, "boxes"));
        assert_eq!(decoded.size(), [40, 3, 4], "{name} decode");
        // Boxes up to exp(4.1)·100 wide: compare relative to their size.
        let reference = e(&format!("{name}.decoded"));
        let scale = f64::try_from(reference.abs().max()).unwrap();
        assert_close(
            &format!("{name} decode"),
            &(decoded / scale),
            &(reference / scale),
            1e-6,
        );
    }
}

#[test]
fn nms_matches_torchvision() {
    let Some(expected) = expected("nms against torchvision") else {
        return;
    };
    let cases = build_cases();
    for spec in cases.of_op("nms") {
        let name = spec["name"].as_str().unwrap();
        let threshold = spec["iou_threshold"].as_f64().unwrap();
        let (boxes, scores) = (cases.input(name, "boxes"), cases.input(name, "scores"));
        let keep = nms(boxes, scores, threshold);
        assert_same_indices(name, &keep, get(&expected, &format!("{name}.keep")));
        // The CUDA algorithm (on the CPU here) keeps the same boxes, except where an IoU is
        // f32(1/3) against the f64 threshold 1/3: the CUDA kernel compares in f32 (equal: kept),
        // the CPU kernel in f64 (above: suppressed).
        if name == "nms_boundary_third" {
            let by_mask = nms_by_mask(boxes, scores, threshold);
            assert_eq!(Vec::<i64>::try_from(&by_mask).unwrap(), [0, 2, 3, 4]);
        } else {
            assert_same_indices(
                &format!("{name} by mask"),
                &nms_by_mask(boxes, scores, threshold),
                &keep,
            );
        }
    }
    let keep = |name: &str| Vec::<i64>::try_from(get(&expected, &format!("{name}.keep"))).unwrap();
    // The references themselves: IoU 0.5 is not above 0.5 (kept), f32(1/3) is above 1/3.
    assert_eq!(keep("nms_boundary_half"), [0, 1, 2, 3, 4]);
    assert_eq!(keep("nms_boundary_third"), [0, 2, 4]);
    for spec in cases.of_op("batched_nms") {
        let name = spec["name"].as_str().unwrap();
        let threshold = spec["iou_threshold"].as_f64().unwrap();
        let keep = batched_nms(
            cases.input(name, "boxes"),
            cases.input(name, "scores"),
            cases.input(name, "idxs"),
            threshold,
        );
        assert_same_indices(name, &keep, get(&expected, &format!("{name}.keep")));
    }
}

/// Runs one roi_align case forward and backward: (output, gradient of `sum(output ·
/// grad_output)` with respect to the input).
fn roi_align_case(cases: &Cases, spec: &Value) -> (Tensor, Tensor) {
    let name = spec["name"].as_str().unwrap();
    let input = cases.input(name, "input").copy().set_requires_grad(true);
    let output = roi_align(
        &input,
        cases.input(name, "rois"),
        (spec["oh"].as_i64().unwrap(), spec["ow"].as_i64().unwrap()),
        spec["spatial_scale"].as_f64().unwrap(),
        spec["sampling_ratio"].as_i64().unwrap(),
        spec["aligned"].as_bool().unwrap(),
    );
    (&output * cases.input(name, "grad_output"))
        .sum(output.kind())
        .backward();
    (output.detach(), input.grad())
}

#[test]
fn roi_align_and_its_gradient_match_torchvision() {
    let Some(expected) = expected("roi_align against torchvision") else {
        return;
    };
    let cases = build_cases();
    for spec in cases.of_op("roi_align") {
        let name = spec["name"].as_str().unwrap();
        let (output, grad) = roi_align_case(&cases, spec);
        let tolerance = if output.kind() == Kind::Double {
            1e-12
        } else {
            1e-5
        };
        let output_ref = get(&expected, &format!("{name}.output"));
        let grad_ref = get(&expected, &format!("{name}.grad_input"));
        let output_diff = max_abs_diff(&format!("{name} output"), &output, output_ref);
        let grad_diff = max_abs_diff(&format!("{name} gradient"), &grad, grad_ref);
        println!("{name}: max |difference| output {output_diff:.1e}, gradient {grad_diff:.1e}");
        assert!(
            output_diff <= tolerance,
            "{name} output: max |difference| {output_diff} > {tolerance}"
        );
        assert!(
            grad_diff <= tolerance,
            "{name} gradient: max |difference| {grad_diff} > {tolerance}"
        );
        // Not vacuous: the outputs and the gradient carry values.
        assert!(
            f64::try_from(output_ref.abs().max()).unwrap() > 0.1,
            "{name}"
        );
    }
    // The fully outside RoIs (rows 26, 27) pool to zero; the inverted one (row 31) too when
    // `aligned` leaves it an empty adaptive grid.
    let out = get(&expected, "roi_sr2_legacy.output");
    for row in [26, 27] {
        assert_eq!(f64::try_from(out.get(row).abs().max()).unwrap(), 0.0);
    }
    let out = get(&expected, "roi_sr0_aligned.output");
    assert_eq!(f64::try_from(out.get(31).abs().max()).unwrap(), 0.0);
}

#[test]
fn box_ops_known_values() {
    let b = |v: &[f32]| Tensor::from_slice(v).view([-1, 4]);
    let iou = box_iou(
        &b(&[0.0, 0.0, 10.0, 10.0]),
        &b(&[5.0, 5.0, 15.0, 15.0, 20.0, 20.0, 30.0, 30.0]),
    );
    assert_close(
        "iou",
        &iou,
        &Tensor::from_slice(&[25.0f32 / 175.0, 0.0]).view([1, 2]),
        1e-7,
    );
    assert_eq!(box_iou(&b(&[]), &b(&[0.0, 0.0, 1.0, 1.0])).size(), [0, 1]);
    assert_close(
        "area",
        &box_area(&b(&[1.0, 2.0, 4.0, 7.0])),
        &Tensor::from_slice(&[15.0f32]),
        0.0,
    );
    let clipped = clip_boxes_to_image(&b(&[-5.0, 3.0, 120.0, 90.0]), 80, 100);
    assert_close("clip", &clipped, &b(&[0.0, 3.0, 100.0, 80.0]), 0.0);
    let keep = remove_small_boxes(
        &b(&[0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 4.9, 9.0, 0.0, 0.0, 9.0, 4.9]),
        5.0,
    );
    assert_eq!(Vec::<i64>::try_from(&keep).unwrap(), [0]);

    // Encoding then decoding gives the reference boxes back.
    let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
    assert!((coder.bbox_xform_clip - (1000.0f64 / 16.0).ln()).abs() < 1e-15);
    let proposals = b(&[0.0, 0.0, 10.0, 20.0, 5.0, 5.0, 9.0, 7.0]);
    let reference = b(&[1.0, 2.0, 13.0, 18.0, 4.0, 6.0, 10.0, 7.5]);
    let codes = coder.encode(&reference, &proposals);
    assert_eq!(codes.size(), [2, 4]);
    assert_close(
        "round trip",
        &coder.decode(&codes, &proposals).view([2, 4]),
        &reference,
        1e-5,
    );
    // A huge size regression is clamped: at most 1000/16 times the box.
    let huge = Tensor::from_slice(&[0.0f32, 0.0, 100.0, 100.0]).view([1, 4]);
    let decoded = coder.decode(&huge, &b(&[0.0, 0.0, 2.0, 2.0]));
    assert_close(
        "clamp",
        &decoded,
        &b(&[1.0 - 62.5, 1.0 - 62.5, 1.0 + 62.5, 1.0 + 62.5]).view([1, 1, 4]),
        1e-4,
    );
    // No boxes: [0, K, 4].
    assert_eq!(
        coder
            .decode(
                &Tensor::zeros([0, 8], (Kind::Float, tch::Device::Cpu)),
                &b(&[])
            )
            .size(),
        [0, 2, 4]
    );
}

#[test]
fn nms_edge_cases() {
    let none = Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
    let no_scores = Tensor::zeros([0], (Kind::Float, tch::Device::Cpu));
    for keep in [
        nms(&none, &no_scores, 0.5),
        nms_by_mask(&none, &no_scores, 0.5),
        batched_nms(
            &none,
            &no_scores,
            &Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
            0.5,
        ),
    ] {
        assert_eq!((keep.size(), keep.kind()), (vec![0], Kind::Int64));
    }
    // Identical boxes with equal scores: the first in index order survives.
    let boxes = Tensor::from_slice(&[0.0f32, 0.0, 10.0, 10.0]).repeat([4, 1]);
    let scores = Tensor::from_slice(&[0.3f32, 0.5, 0.5, 0.1]);
    assert_eq!(
        Vec::<i64>::try_from(&nms(&boxes, &scores, 0.5)).unwrap(),
        [1]
    );
    // ... unless they are of different categories.
    let idxs = Tensor::from_slice(&[0i64, 1, 1, 0]);
    assert_eq!(
        Vec::<i64>::try_from(&batched_nms(&boxes, &scores, &idxs, 0.5)).unwrap(),
        [1, 0]
    );

    // The mask algorithm over several 64-bit words agrees with the host loop.
    let mut g = Gen::new(7);
    for n in [1, 63, 64, 65, 700] {
        let boxes = g.boxes(n, 0.0, 300.0, 60.0);
        let scores = g.tied_scores(n, 20);
        let keep = nms(&boxes, &scores, 0.4);
        assert_same_indices(
            &format!("{n} boxes by mask"),
            &nms_by_mask(&boxes, &scores, 0.4),
            &keep,
        );
        // Kept boxes overlap each other by at most the threshold; scores never increase.
        let kept = boxes.index_select(0, &keep);
        let iou =
            box_iou(&kept, &kept) - Tensor::eye(keep.size()[0], (Kind::Float, tch::Device::Cpu));
        assert!(f64::try_from(iou.max()).unwrap() <= 0.4, "{n} boxes");
        let s = Vec::<f32>::try_from(&scores.index_select(0, &keep)).unwrap();
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "{n} boxes: score order");
    }
}

#[test]
fn roi_align_edge_cases() {
    let cpu = (Kind::Float, tch::Device::Cpu);
    let input =
        (Tensor::arange(2 * 3 * 8 * 10, cpu).view([2, 3, 8, 10]) / 100.0).set_requires_grad(true);
    // No RoIs: [0, C, oh, ow].
    let empty = roi_align(&input, &Tensor::zeros([0, 5], cpu), (7, 7), 1.0, 2, false);
    assert_eq!(empty.size(), [0, 3, 7, 7]);
    // ... still in the input's graph: a loss over no RoIs back-propagates zeros.
    let grad = Tensor::run_backward(&[empty.sum(Kind::Float)], &[&input], false, false);
    assert_eq!(f64::try_from(grad[0].abs().sum(Kind::Double)).unwrap(), 0.0);

    // A constant map pools to the constant wherever the samples are valid, and the gradient of
    // the sum of outputs is the number of outputs (each bin's weights sum to one).
    let constant = Tensor::full([1, 2, 6, 9], 2.5, cpu).set_requires_grad(true);
    let rois =
        Tensor::from_slice(&[0.0f32, 0.0, 0.0, 8.0, 5.0, 0.0, 1.3, 2.2, 4.4, 3.1]).view([2, 5]);
    for sampling_ratio in [1, 2, 0] {
        let out = roi_align(&constant, &rois, (3, 2), 1.0, sampling_ratio, true);
        assert_close(
            "constant",
            &out,
            &Tensor::full([2, 2, 3, 2], 2.5, cpu),
            1e-6,
        );
        let grad = Tensor::run_backward(&[out.sum(Kind::Float)], &[&constant], false, false);
        assert!((f64::try_from(grad[0].sum(Kind::Double)).unwrap() - 24.0).abs() < 1e-4);
    }

    // Rows of the result follow the RoIs, whatever their images and grid sizes.
    let rois = Tensor::from_slice(&[
        1.0f32, 0.0, 0.0, 9.0, 7.0, 0.0, 2.0, 1.0, 4.0, 3.0, 1.0, 2.0, 1.0, 4.0, 3.0,
    ])
    .view([3, 5]);
    let together = roi_align(&input, &rois, (2, 2), 1.0, 0, false);
    for k in 0..3 {
        let alone = roi_align(&input, &rois.narrow(0, k, 1), (2, 2), 1.0, 0, false);
        assert_close(&format!("RoI {k}"), &together.narrow(0, k, 1), &alone, 0.0);
    }
    assert!(f64::try_from((together.get(1) - together.get(2)).abs().min()).unwrap() > 0.5);

    // Gradients reach the input only where the RoI samples it.
    let out = roi_align(&input, &rois.narrow(0, 1, 1), (2, 2), 1.0, 2, false);
    let grad = &Tensor::run_backward(&[out.sum(Kind::Float)], &[&input], false, false)[0];
    assert_eq!(
        f64::try_from(grad.get(1).abs().sum(Kind::Double)).unwrap(),
        0.0
    );
    assert!(f64::try_from(grad.get(0).sum(Kind::Double)).unwrap() > 11.9);
}

#[test]
#[should_panic(expected = "batch index 2")]
fn roi_align_refuses_a_batch_index_beyond_the_input() {
    let input = Tensor::zeros([2, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
    let rois = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0, 1.0]).view([1, 5]);
    let _ = roi_align(&input, &rois, (2, 2), 1.0, 2, false);
}

/// FPN-like RoIAlign (512 RoIs over 4 levels of 256 channels, 7×7, sampling 2, the levels as
/// torchvision's `LevelMapper` assigns them) forward + backward, and NMS of 4000 boxes, against
/// torchvision on the same data in the same run. Prints the times and the largest difference of
/// the pooled features (f32 at full FPN size); asserts nothing about the times.
#[test]
#[ignore]
fn bench_roi_align_and_nms_against_torchvision() {
    use std::time::Instant;
    let mut g = Gen::new(1);
    let image = 800.0f32;
    let rois: Vec<f32> = (0..512)
        .flat_map(|_| {
            let (w, h) = (g.0.gen_range(16.0f32..500.0), g.0.gen_range(16.0f32..500.0));
            let (x, y) = (g.0.gen_range(0.0..image - w), g.0.gen_range(0.0..image - h));
            [0.0, x, y, x + w, y + h]
        })
        .collect();
    let rois = Tensor::from_slice(&rois).view([512, 5]);
    let area = (rois.select(1, 3) - rois.select(1, 1)) * (rois.select(1, 4) - rois.select(1, 2));
    let levels = ((area.sqrt() / 224.0).log2() + 4.0 + 1e-6).floor();
    let levels = levels.clamp(2.0, 5.0).to_kind(Kind::Int64) - 2;
    let features: Vec<Tensor> = (0..4)
        .map(|l| g.normal(&[1, 256, 200 >> l, 200 >> l]))
        .collect();
    let level_rois: Vec<Tensor> = (0..4)
        .map(|l| rois.index_select(0, &levels.eq(l).nonzero().view([-1])))
        .collect();
    let counts: Vec<i64> = level_rois.iter().map(|r| r.size()[0]).collect();
    let run = || {
        let inputs: Vec<Tensor> = features
            .iter()
            .map(|f| f.copy().set_requires_grad(true))
            .collect();
        let outs: Vec<Tensor> = (0..4)
            .map(|l| {
                roi_align(
                    &inputs[l],
                    &level_rois[l],
                    (7, 7),
                    1.0 / (4 << l) as f64,
                    2,
                    false,
                )
            })
            .collect();
        let pooled = Tensor::cat(&outs, 0);
        pooled.sum(Kind::Float).backward();
        pooled.detach()
    };
    let pooled = run();
    let reps = 3;
    let start = Instant::now();
    for _ in 0..reps {
        let _ = run();
    }
    let ours = start.elapsed().as_secs_f64() / reps as f64;

    let boxes = g.boxes(4000, 0.0, 800.0, 120.0);
    let scores = Tensor::from_slice(&g.uniform(4000, 0.0, 1.0));
    let time = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        let start = Instant::now();
        for _ in 0..10 {
            let _ = f();
        }
        start.elapsed().as_secs_f64() / 10.0
    };
    let nms_host = time(&|| nms(&boxes, &scores, 0.7));
    let nms_mask = time(&|| nms_by_mask(&boxes, &scores, 0.7));

    let dir = tempfile::tempdir().unwrap();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for l in 0..4 {
        tensors.push((format!("features{l}"), features[l].shallow_clone()));
        tensors.push((format!("rois{l}"), level_rois[l].shallow_clone()));
    }
    tensors.push(("boxes".into(), boxes.shallow_clone()));
    tensors.push(("scores".into(), scores.shallow_clone()));
    Tensor::write_safetensors(&tensors, dir.path().join("bench.safetensors")).unwrap();
    let script = r#"
import sys, time, torch
from safetensors.torch import load_file, save_file
from torchvision.ops import roi_align, nms
d = sys.argv[1]
x = load_file(f"{d}/bench.safetensors")
def run():
    ins = [x[f"features{l}"].clone().requires_grad_(True) for l in range(4)]
    outs = [roi_align(ins[l], x[f"rois{l}"], (7, 7), 1.0 / (4 << l), 2, False) for l in range(4)]
    pooled = torch.cat(outs)
    pooled.sum().backward()
    return pooled.detach()
save_file({"pooled": run(), "keep": nms(x["boxes"], x["scores"], 0.7)}, f"{d}/reference.safetensors")
t = time.perf_counter()
for _ in range(3): run()
ra = (time.perf_counter() - t) / 3
t = time.perf_counter()
for _ in range(10): nms(x["boxes"], x["scores"], 0.7)
print(ra, (time.perf_counter() - t) / 10, torch.get_num_threads())
"#;
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let theirs: Vec<f64> = stdout
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_same_indices(
        "nms of 4000 boxes",
        &nms(&boxes, &scores, 0.7),
        &reference["keep"],
    );
    let diff = max_abs_diff("FPN roi_align", &pooled, &reference["pooled"]);
    println!(
        "RoIs per level {counts:?}; threads: ours {}, torchvision {}",
        tch::get_num_threads(),
        theirs[2]
    );
    println!(
        "roi_align forward+backward: ours {:.1} ms, torchvision {:.1} ms; max |difference| of the pooled features {diff:.1e}",
        ours * 1e3,
        theirs[0] * 1e3
    );
    println!(
        "nms of 4000 boxes: ours {:.2} ms (host loop), {:.2} ms (mask algorithm on the CPU), torchvision {:.2} ms",
        nms_host * 1e3,
        nms_mask * 1e3,
        theirs[1] * 1e3
    );
}
