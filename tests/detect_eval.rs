//! `tricks::detect::coco_eval` against pycocotools' `COCOeval(iouType="bbox")`: the 12 summary
//! stats and every category's AP@[.5:.95] must agree to 1e-6 on generated cases (many images and
//! categories, gts of every size class with crowds and tiny boxes, jittered detections and false
//! positives, exact score ties, more than 100 detections in an image, images and categories
//! missing from either side, evaluated subsets, empty inputs) and on a COCO-style annotation
//! file with its results file, which both sides read from disk. One Python process evaluates all
//! cases. Without python or pycocotools the comparison prints why and passes, unless
//! `TRICKS_REQUIRE_PARITY=1`. The hand-made cases below need no Python.

mod common;

use common::{python, skip_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use tricks::detect::coco_eval::{
    evaluate, iou_thresholds, recall_thresholds, write_results, CocoStats, Detection, GroundTruth,
};

fn gt(image_id: i64, category_id: i64, bbox: [f64; 4], iscrowd: bool) -> GroundTruth {
    GroundTruth {
        image_id,
        category_id,
        bbox,
        area: bbox[2] * bbox[3],
        iscrowd,
    }
}

fn dt(image_id: i64, category_id: i64, bbox: [f64; 4], score: f64) -> Detection {
    Detection {
        image_id,
        category_id,
        bbox,
        score,
    }
}

/// Asserts `stats` equal `expected` to rounding (a precision of 1 is 1 / (1 + eps) in
/// pycocotools too).
fn assert_stats(stats: &[f64; 12], expected: [f64; 12]) {
    let close = stats
        .iter()
        .zip(&expected)
        .all(|(a, b)| (a - b).abs() < 1e-12);
    assert!(close, "stats {stats:?}, expected {expected:?}");
}

#[test]
fn hand_made_cases_give_known_values() {
    // One small object found exactly: everything measurable is 1, the other sizes -1.
    let gts = [gt(1, 1, [10.0, 10.0, 20.0, 20.0], false)];
    let hit = dt(1, 1, [10.0, 10.0, 20.0, 20.0], 0.9);
    let s = evaluate(&[1, 2], &[1, 2], &gts, std::slice::from_ref(&hit));
    let measured = [
        1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0,
    ];
    assert_stats(&s.stats, measured);
    assert_eq!(s.per_category_ap[1], (2, -1.0));
    assert!((s.per_category_ap[0].1 - 1.0).abs() < 1e-12);
    assert_eq!((s.ap_medium(), s.ar1()), (-1.0, 1.0));

    // A false positive ranked above it: precision 1/2 at recall 1, and AR@1 keeps only the
    // false positive.
    let miss = dt(1, 1, [100.0, 100.0, 20.0, 20.0], 0.95);
    let s = evaluate(&[1], &[1], &gts, &[hit.clone(), miss.clone()]);
    assert!((s.map() - 0.5).abs() < 1e-12, "{:?}", s.stats);
    assert_eq!((s.ar1(), s.ar10(), s.ar100()), (0.0, 1.0, 1.0));

    // The same false positive inside a crowd region is neither right nor wrong.
    let crowd = gt(1, 1, [90.0, 90.0, 200.0, 200.0], true);
    let s = evaluate(
        &[1],
        &[1],
        &[gts[0].clone(), crowd.clone()],
        &[hit.clone(), miss],
    );
    assert!((s.map() - 1.0).abs() < 1e-12);
    // A crowd alone is no object to find: nothing is measurable.
    let s = evaluate(&[1], &[1], &[crowd], std::slice::from_ref(&hit));
    assert_eq!(s.stats, [-1.0; 12]);
    assert_eq!(s.per_category_ap, vec![(1, -1.0)]);

    // No detections: 0 where there is ground truth; no ground truth: -1; nothing evaluated: -1.
    let s = evaluate(&[1], &[1], &gts, &[]);
    assert_stats(
        &s.stats,
        [
            0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0,
        ],
    );
    let no_gt = evaluate(&[1], &[1], &[], std::slice::from_ref(&hit));
    assert_eq!(no_gt.stats, [-1.0; 12]);
    let nothing = evaluate(&[], &[], &gts, std::slice::from_ref(&hit));
    assert_eq!(
        (nothing.stats, nothing.per_category_ap),
        ([-1.0; 12], vec![])
    );

    // Detections on images or categories outside the evaluated ones change nothing.
    let stray = [
        dt(7, 1, [10.0, 10.0, 20.0, 20.0], 1.0),
        dt(1, 5, [0.0, 0.0, 5.0, 5.0], 1.0),
    ];
    let with_stray = evaluate(
        &[1, 2],
        &[1, 2],
        &gts,
        &[hit.clone(), stray[0].clone(), stray[1].clone()],
    );
    assert_eq!(with_stray, evaluate(&[1, 2], &[1, 2], &gts, &[hit]));
}

#[test]
fn thresholds_are_pycocotools_floats() {
    let iou = iou_thresholds();
    assert_eq!(
        (iou[0], iou[5], iou[8], iou[9]),
        (0.5, 0.75, 0.8999999999999999, 0.95)
    );
    let rec = recall_thresholds();
    assert_eq!((rec.len(), rec[0], rec[7], rec[100]), (101, 0.0, 0.07, 1.0));
}

#[test]
fn write_results_writes_a_coco_results_array_and_refuses_nan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.json");
    let dts = vec![
        dt(3, 18, [1.5, 2.0, 30.25, 0.1], 0.123456789012345),
        dt(4, 1, [0.0, 0.0, 1.0, 1.0], 1e-9),
    ];
    write_results(&path, &dts).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        value[0],
        json!({"image_id": 3, "category_id": 18, "bbox": [1.5, 2.0, 30.25, 0.1], "score": 0.123456789012345})
    );
    let back: Vec<Detection> = serde_json::from_str(&text).unwrap();
    assert_eq!(back, dts);

    let err = write_results(&path, &[dt(9, 2, [0.0, 0.0, 1.0, f64::NAN], 0.5)]).unwrap_err();
    assert!(err.to_string().contains("detection 0 (image 9"), "{err}");
    let missing = dir.path().join("no/such/dir/results.json");
    let err = write_results(&missing, &dts).unwrap_err();
    assert!(
        format!("{err:#}").contains("no/such/dir/results.json"),
        "{err:#}"
    );
}

/// A generated evaluation: the evaluated images and categories, every ground truth and
/// detection (also on images / categories outside them), and the annotation file's lists.
struct Case {
    name: String,
    all_image_ids: Vec<i64>,
    all_category_ids: Vec<i64>,
    gts: Vec<GroundTruth>,
    dts: Vec<Detection>,
    /// pycocotools' `params.imgIds` / `params.catIds` when not the file's.
    image_subset: Option<Vec<i64>>,
    category_subset: Option<Vec<i64>>,
}

/// A box of random position and a size drawn from a random size class (tiny below 3 px).
fn random_box(rng: &mut ChaCha8Rng, width: f64, height: f64) -> [f64; 4] {
    let side = match rng.gen_range(0..5) {
        0 => rng.gen_range(0.2..3.0),
        1 => rng.gen_range(3.0..32.0),
        2 => rng.gen_range(28.0..100.0),
        3 => rng.gen_range(90.0..300.0),
        _ => rng.gen_range(5.0..150.0),
    };
    let aspect: f64 = rng.gen_range(0.5..2.0);
    let (w, h) = (round2(side * aspect.sqrt()), round2(side / aspect.sqrt()));
    let x = round2(rng.gen_range(0.0..(width - w).max(1.0)));
    let y = round2(rng.gen_range(0.0..(height - h).max(1.0)));
    [x, y, w, h]
}

/// `b` moved and resized by up to `fraction` of its size.
fn jittered(rng: &mut ChaCha8Rng, b: [f64; 4], fraction: f64) -> [f64; 4] {
    let mut jitter = |v: f64, size: f64| round2(v + size * rng.gen_range(-fraction..fraction));
    [
        jitter(b[0], b[2]),
        jitter(b[1], b[3]),
        jitter(b[2], b[2]).max(0.0),
        jitter(b[3], b[3]).max(0.0),
    ]
}

/// A segment's area: a part of its box, or exactly on a size-class boundary.
fn segment_area(rng: &mut ChaCha8Rng, bbox: [f64; 4]) -> f64 {
    match rng.gen_range(0..10) {
        0 => 1024.0,
        1 => 9216.0,
        _ => round2(bbox[2] * bbox[3] * rng.gen_range(0.5..1.0)),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A score, a multiple of 0.1 two times in five so that ties happen within and across images.
fn random_score(rng: &mut ChaCha8Rng) -> f64 {
    if rng.gen_bool(0.4) {
        rng.gen_range(1..=10) as f64 / 10.0
    } else {
        rng.gen_range(0.0..1.0)
    }
}

/// `images` images over the categories `[1, 3, 18, 44, 90]`: 44 has detections only, 90
/// ground truth only; detections also of category 91 (absent from the file). Objects per image
/// up to `max_objects`; image 0 holds more than 100 detections of one category.
fn generate(name: &str, seed: u64, images: usize, max_objects: usize) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let categories = vec![1, 3, 18, 44, 90];
    let gt_categories = [1, 3, 18, 90];
    let dt_categories = [1, 3, 18, 44, 91];
    // Non-contiguous ids, listed out of order.
    let mut image_ids: Vec<i64> = (0..images as i64).map(|i| 1000 - 7 * i).collect();
    image_ids.swap(0, images / 2);
    let (mut gts, mut dts) = (Vec::new(), Vec::new());
    for (i, &image_id) in image_ids.iter().enumerate() {
        let (width, height) = (rng.gen_range(200.0..640.0), rng.gen_range(200.0..640.0));
        let without_gts = i % 9 == 4;
        let without_dts = i % 11 == 5;
        let num_gts = if without_gts {
            0
        } else {
            rng.gen_range(1..=max_objects)
        };
        let first_gt = gts.len();
        for _ in 0..num_gts {
            let category_id = gt_categories[rng.gen_range(0..gt_categories.len())];
            let iscrowd = rng.gen_bool(0.08);
            let mut bbox = random_box(&mut rng, width, height);
            if iscrowd {
                bbox[2] = round2(bbox[2] * 2.0 + 20.0);
                bbox[3] = round2(bbox[3] * 2.0 + 20.0);
            }
            gts.push(GroundTruth {
                image_id,
                category_id,
                bbox,
                area: segment_area(&mut rng, bbox),
                iscrowd,
            });
            // Now and then a second object (or crowd) on top of it, maybe of another size
            // class, so that one detection can match several gts.
            if rng.gen_bool(0.2) {
                let bbox = jittered(&mut rng, bbox, 0.1);
                gts.push(GroundTruth {
                    image_id,
                    category_id,
                    bbox,
                    area: segment_area(&mut rng, bbox),
                    iscrowd: rng.gen_bool(0.3),
                });
            }
        }
        if without_dts {
            continue;
        }
        for g in &gts[first_gt..] {
            let b = g.bbox;
            let category_id = if rng.gen_bool(0.05) {
                dt_categories[rng.gen_range(0..dt_categories.len())]
            } else {
                g.category_id
            };
            for _ in 0..rng.gen_range(0..=2) {
                let bbox = jittered(&mut rng, b, 0.15);
                dts.push(dt(image_id, category_id, bbox, random_score(&mut rng)));
            }
            // IoU k/20 (to rounding), on the thresholds themselves.
            if rng.gen_bool(0.2) {
                let k = rng.gen_range(10..=20) as f64;
                let bbox = [b[0], b[1], b[2], b[3] * k / 20.0];
                dts.push(dt(image_id, category_id, bbox, random_score(&mut rng)));
            }
            // Several detections inside a crowd region, all of them neither right nor wrong.
            if g.iscrowd {
                for _ in 0..rng.gen_range(0..=3) {
                    let (w, h) = (b[2] * 0.3, b[3] * 0.3);
                    let x = round2(b[0] + rng.gen_range(0.0..b[2] - w));
                    let y = round2(b[1] + rng.gen_range(0.0..b[3] - h));
                    let bbox = [x, y, round2(w), round2(h)];
                    dts.push(dt(image_id, category_id, bbox, random_score(&mut rng)));
                }
            }
        }
        let false_positives = if i == 0 {
            130
        } else {
            rng.gen_range(0..=max_objects / 2)
        };
        for k in 0..false_positives {
            let category_id = if i == 0 {
                1
            } else {
                dt_categories[rng.gen_range(0..dt_categories.len())]
            };
            let mut bbox = random_box(&mut rng, width, height);
            match k % 13 {
                // Exactly on the size boundaries, and degenerate.
                0 => (bbox[2], bbox[3]) = (32.0, 32.0),
                1 => (bbox[2], bbox[3]) = (96.0, 96.0),
                2 => bbox[2] = 0.0,
                _ => {}
            }
            dts.push(dt(image_id, category_id, bbox, random_score(&mut rng)));
        }
    }
    Case {
        name: name.into(),
        all_image_ids: image_ids,
        all_category_ids: categories,
        gts,
        dts,
        image_subset: None,
        category_subset: None,
    }
}

/// A number as JSON: an integer when whole (as many COCO files write boxes), else a float.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// The case's ground truth as a COCO `instances_*.json`: images with size and file name,
/// annotations with (non-sequential) ids, polygon segmentations and their own areas, named
/// categories.
fn write_annotation_file(path: &Path, case: &Case) {
    let images: Vec<Value> = case
        .all_image_ids
        .iter()
        .map(|&id| json!({"id": id, "width": 640, "height": 480, "file_name": format!("{id:012}.jpg")}))
        .collect();
    let annotations: Vec<Value> = case
        .gts
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let [x, y, w, h] = g.bbox;
            json!({
                "id": 900_000 + 3 * i as i64,
                "image_id": g.image_id,
                "category_id": g.category_id,
                "bbox": g.bbox.map(number),
                "area": number(g.area),
                "iscrowd": g.iscrowd as i64,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        })
        .collect();
    let categories: Vec<Value> = case
        .all_category_ids
        .iter()
        .map(|&id| json!({"id": id, "name": format!("class{id}"), "supercategory": "thing"}))
        .collect();
    let file = json!({
        "info": {"description": "generated by tests/detect_eval.rs"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    });
    std::fs::write(path, serde_json::to_string(&file).unwrap()).unwrap();
}

/// The parts of a COCO annotation file the evaluation reads, parsed as a user of the API would.
#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: i64,
    category_id: i64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: i64,
}

/// Evaluates an annotation file and a results file as a user of the API would.
fn evaluate_files(annotations: &Path, results: &Path) -> CocoStats {
    let file: CocoFile =
        serde_json::from_str(&std::fs::read_to_string(annotations).unwrap()).unwrap();
    let dts: Vec<Detection> =
        serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    let gts: Vec<GroundTruth> = file
        .annotations
        .iter()
        .map(|a| GroundTruth {
            image_id: a.image_id,
            category_id: a.category_id,
            bbox: a.bbox,
            area: a.area,
            iscrowd: a.iscrowd != 0,
        })
        .collect();
    let image_ids: Vec<i64> = file.images.iter().map(|i| i.id).collect();
    let category_ids: Vec<i64> = file.categories.iter().map(|c| c.id).collect();
    evaluate(&image_ids, &category_ids, &gts, &dts)
}

/// Evaluates every case of the manifest with pycocotools, in this one process; prints
/// {case: {stats, per_category_ap}, "iou_thrs", "rec_thrs"} as JSON.
const SCRIPT: &str = r#"
import contextlib, io, json, sys
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

out = {}
with contextlib.redirect_stdout(io.StringIO()):
    for case in json.load(open(sys.argv[1])):
        gt = COCO(case["gt"])
        with open(case["dt"]) as f:
            anns = json.load(f)
        if anns:
            dt = gt.loadRes(case["dt"])
        else:  # loadRes refuses an empty list: a results set without annotations
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            dt.createIndex()
        E = COCOeval(gt, dt, "bbox")
        if case["img_ids"] is not None:
            E.params.imgIds = case["img_ids"]
        if case["cat_ids"] is not None:
            E.params.catIds = case["cat_ids"]
        E.evaluate(); E.accumulate(); E.summarize()
        per_cat = []
        for k, cat in enumerate(E.params.catIds):
            s = E.eval["precision"][:, :, k, 0, 2]
            s = s[s > -1]
            per_cat.append([int(cat), float(np.mean(s)) if s.size else -1.0])
        out[case["name"]] = {"stats": [float(x) for x in E.stats], "per_category_ap": per_cat}
    p = E.params
out["iou_thrs"] = [float(x) for x in p.iouThrs]
out["rec_thrs"] = [float(x) for x in p.recThrs]
print(json.dumps(out))
"#;

/// Asserts Rust's stats equal pycocotools' (`reference`: {stats, per_category_ap}) to 1e-6;
/// returns the largest difference.
fn assert_matches(name: &str, ours: &CocoStats, reference: &Value) -> f64 {
    let theirs: Vec<f64> = serde_json::from_value(reference["stats"].clone()).unwrap();
    for (i, (a, b)) in ours.stats.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6,
            "{name}: stat {i} ({}) is {a}, pycocotools {b}\nours   {:?}\ntheirs {theirs:?}",
            tricks::detect::coco_eval::STAT_NAMES[i],
            ours.stats
        );
    }
    assert_eq!(theirs.len(), 12, "{name}");
    let per_cat: Vec<(i64, f64)> =
        serde_json::from_value(reference["per_category_ap"].clone()).unwrap();
    assert_eq!(
        ours.per_category_ap.iter().map(|c| c.0).collect::<Vec<_>>(),
        per_cat.iter().map(|c| c.0).collect::<Vec<_>>(),
        "{name}: evaluated categories"
    );
    for (&(id, a), &(_, b)) in ours.per_category_ap.iter().zip(&per_cat) {
        assert!(
            (a - b).abs() <= 1e-6,
            "{name}: category {id} AP is {a}, pycocotools {b}"
        );
    }
    let stats = ours.stats.iter().zip(&theirs).map(|(a, b)| (a - b).abs());
    let categories = ours
        .per_category_ap
        .iter()
        .zip(&per_cat)
        .map(|(a, b)| (a.1 - b.1).abs());
    stats.chain(categories).fold(0.0, f64::max)
}

#[test]
fn matches_pycocotools() {
    let py = python();
    if !py.exists() {
        return skip_reference(
            "COCO eval parity",
            &format!("no python at {}", py.display()),
        );
    }
    let dir = tempfile::tempdir().unwrap();

    let mut cases = vec![
        generate("mixed", 1, 60, 10),
        generate("crowded", 2, 12, 30),
        generate("sparse", 3, 40, 3),
    ];
    let mut subset = generate("subset", 1, 60, 10);
    subset.image_subset = Some(subset.all_image_ids.iter().copied().step_by(2).collect());
    subset.category_subset = Some(vec![3, 18, 44]);
    cases.push(subset);
    cases.push(Case {
        name: "no_detections".into(),
        dts: vec![],
        ..generate("", 1, 60, 10)
    });
    cases.push(Case {
        name: "no_ground_truth".into(),
        gts: vec![],
        ..generate("", 1, 60, 10)
    });
    let mut nothing = generate("nothing_evaluated", 1, 5, 3);
    nothing.image_subset = Some(vec![]);
    cases.push(nothing);

    // Every case as files for pycocotools; Rust evaluates the cases from memory, and "mixed"
    // once more from its files.
    let mut manifest = Vec::new();
    for case in &cases {
        let gt_path = dir.path().join(format!("{}_instances_val.json", case.name));
        let dt_path = dir.path().join(format!("{}_results.json", case.name));
        write_annotation_file(&gt_path, case);
        write_results(&dt_path, &case.dts).unwrap();
        manifest.push(json!({
            "name": case.name, "gt": gt_path, "dt": dt_path,
            "img_ids": case.image_subset, "cat_ids": case.category_subset,
        }));
    }
    let manifest_path = dir.path().join("cases.json");
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();

    let started = std::time::Instant::now();
    let o = Command::new(&py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&manifest_path)
        .output()
        .unwrap();
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("ModuleNotFoundError") {
            return skip_reference(
                "COCO eval parity",
                &format!(
                    "a python package is missing: {}",
                    err.lines().last().unwrap_or("")
                ),
            );
        }
        panic!("the pycocotools script failed:\n{err}");
    }
    eprintln!("pycocotools: {:.1} s", started.elapsed().as_secs_f64());
    let reference: Value = serde_json::from_slice(&o.stdout).unwrap();

    // The thresholds are numpy's floats to the bit.
    let iou_thrs: Vec<f64> = serde_json::from_value(reference["iou_thrs"].clone()).unwrap();
    let rec_thrs: Vec<f64> = serde_json::from_value(reference["rec_thrs"].clone()).unwrap();
    assert_eq!(iou_thrs, iou_thresholds().to_vec());
    assert_eq!(rec_thrs, recall_thresholds().to_vec());

    let started = std::time::Instant::now();
    for case in &cases {
        let image_ids = case.image_subset.as_ref().unwrap_or(&case.all_image_ids);
        let category_ids = case
            .category_subset
            .as_ref()
            .unwrap_or(&case.all_category_ids);
        let ours = evaluate(image_ids, category_ids, &case.gts, &case.dts);
        let diff = assert_matches(&case.name, &ours, &reference[&case.name]);
        eprintln!(
            "{:<16} largest difference {diff:.1e}; {:?}",
            case.name, ours.stats
        );
    }
    let from_files = evaluate_files(
        &dir.path().join("mixed_instances_val.json"),
        &dir.path().join("mixed_results.json"),
    );
    assert_matches("mixed, from its files", &from_files, &reference["mixed"]);
    eprintln!("tricks: {:.3} s", started.elapsed().as_secs_f64());

    // The cases exercise what they claim: a partial score, categories without ground truth,
    // more than 100 detections in one image and category.
    let base = &cases[0];
    let mixed = evaluate(
        &base.all_image_ids,
        &base.all_category_ids,
        &base.gts,
        &base.dts,
    );
    assert!(mixed.map() > 0.1 && mixed.map() < 0.9, "{:?}", mixed.stats);
    assert!(mixed.stats.iter().all(|&s| s > 0.0), "{:?}", mixed.stats);
    assert_eq!(from_files, mixed);
    assert_eq!(
        mixed
            .per_category_ap
            .iter()
            .filter(|c| c.1 == -1.0)
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![44]
    );
    let first = base.all_image_ids[0];
    let crowded = base
        .dts
        .iter()
        .filter(|d| d.image_id == first && d.category_id == 1)
        .count();
    assert!(crowded > 100, "{crowded}");
}
