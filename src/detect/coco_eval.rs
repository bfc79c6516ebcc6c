//! COCO box evaluation, computed as `pycocotools.cocoeval.COCOeval(iouType="bbox")` computes it:
//! the same 12 summary numbers (AP@[.5:.95], AP50, AP75, AP by object size, AR at 1/10/100
//! detections and by size) and the per-category AP@[.5:.95], equal to pycocotools' to rounding
//! (`tests/detect_eval.rs` checks them against it to 1e-6).
//!
//! The three steps keep pycocotools' names and order: `evaluate_img` matches one image's
//! detections of one category to its ground truth at every IoU threshold, `accumulate` turns one
//! category's matches over all images into interpolated precision and recall per area range and
//! detection limit, `summarize` averages those over the categories into [`CocoStats`]. Every tie-break is
//! pycocotools' (stable sorts by score, images in ascending id order), since ties decide which
//! detection counts first.
//!
//! Deviations, all where pycocotools has no answer or refuses:
//! * pycocotools' `loadRes` refuses results on images missing from the ground-truth file and an
//!   empty results list; [`evaluate`] drops the former (as `COCOeval` drops every annotation
//!   outside `params.imgIds` / `params.catIds`) and evaluates the latter as no detections.
//! * A ground truth here has no annotation id. pycocotools records a match by the gt's id and
//!   takes id 0 for "unmatched"; real annotation files number from 1, which this equals.

use anyhow::Context;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One ground-truth object. bbox = [x, y, w, h] in pixels (COCO's).
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    /// The annotation's `area` field (COCO's segment area, not the box's): it alone decides the
    /// object's size class.
    pub area: f64,
    /// A crowd region: never a miss, and a detection on it is neither right nor wrong.
    pub iscrowd: bool,
}

/// One detection. bbox = [x, y, w, h]. Serialised as one entry of a COCO results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub score: f64,
}

/// The evaluation's result: fractions in 0..=1 as pycocotools', -1 where nothing was measurable
/// (no ground truth in the slice).
#[derive(Debug, Clone, PartialEq)]
pub struct CocoStats {
    /// pycocotools' `COCOeval.stats`, in its order (see [`STAT_NAMES`]).
    pub stats: [f64; 12],
    /// AP@[.5:.95] (all areas, 100 detections) of each evaluated category, by ascending id; -1
    /// for a category without (non-crowd) ground truth.
    pub per_category_ap: Vec<(i64, f64)>,
}

/// Short names of [`CocoStats::stats`]' entries, in order.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

impl CocoStats {
    /// AP@[.5:.95], area all, 100 detections: COCO's headline mAP.
    pub fn map(&self) -> f64 {
        self.stats[0]
    }
    /// AP at IoU 0.5 (Pascal VOC's metric).
    pub fn ap50(&self) -> f64 {
        self.stats[1]
    }
    /// AP at IoU 0.75.
    pub fn ap75(&self) -> f64 {
        self.stats[2]
    }
    /// AP@[.5:.95] of small objects (area < 32²).
    pub fn ap_small(&self) -> f64 {
        self.stats[3]
    }
    /// AP@[.5:.95] of medium objects (32² ≤ area ≤ 96²).
    pub fn ap_medium(&self) -> f64 {
        self.stats[4]
    }
    /// AP@[.5:.95] of large objects (area > 96²).
    pub fn ap_large(&self) -> f64 {
        self.stats[5]
    }
    /// AR@[.5:.95] with 1 detection per image and category.
    pub fn ar1(&self) -> f64 {
        self.stats[6]
    }
    /// AR@[.5:.95] with 10 detections per image and category.
    pub fn ar10(&self) -> f64 {
        self.stats[7]
    }
    /// AR@[.5:.95] with 100 detections per image and category.
    pub fn ar100(&self) -> f64 {
        self.stats[8]
    }
    /// AR@[.5:.95] (100 detections) of small objects.
    pub fn ar_small(&self) -> f64 {
        self.stats[9]
    }
    /// AR@[.5:.95] (100 detections) of medium objects.
    pub fn ar_medium(&self) -> f64 {
        self.stats[10]
    }
    /// AR@[.5:.95] (100 detections) of large objects.
    pub fn ar_large(&self) -> f64 {
        self.stats[11]
    }
}

/// Detections kept per image and category, each limit evaluated (pycocotools' `maxDets`).
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

/// Object size classes by area (pycocotools' `areaRngLbl`, `areaRng`), bounds inclusive.
pub const AREA_RANGES: [(&str, [f64; 2]); 4] = [
    ("all", [0.0, 1e10]),
    ("small", [0.0, 32.0 * 32.0]),
    ("medium", [32.0 * 32.0, 96.0 * 96.0]),
    ("large", [96.0 * 96.0, 1e10]),
];

/// Number of IoU thresholds.
const T: usize = 10;
/// Number of recall thresholds.
const R: usize = 101;
/// Number of area ranges.
const A: usize = AREA_RANGES.len();
/// Number of detection limits.
const M: usize = MAX_DETS.len();

/// `np.linspace(start, stop, N)` to the bit: `i * step + start`, the last point `stop`.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut points = [0.0; N];
    for (i, p) in points.iter_mut().enumerate() {
        *p = i as f64 * step + start;
    }
    points[N - 1] = stop;
    points
}

/// IoU thresholds 0.50:0.05:0.95, the very floats of pycocotools' `iouThrs`.
pub fn iou_thresholds() -> [f64; T] {
    linspace(0.5, 0.95)
}

/// Recall thresholds 0:0.01:1, the very floats of pycocotools' `recThrs`.
pub fn recall_thresholds() -> [f64; R] {
    linspace(0.0, 1.0)
}

/// Orders scores highest first as `np.argsort(-score)` does (NaN last); used with a stable sort,
/// like pycocotools' `kind='mergesort'`.
fn by_score_descending(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a)
        .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// IoU of a detection and a ground-truth box (both x, y, w, h) as pycocotools' `bbIou`
/// (maskApi.c): for a crowd gt the intersection over the detection's area alone, since a
/// detection inside a crowd region is not wrong however small it is.
fn bb_iou(dt: &[f64; 4], gt: &[f64; 4], iscrowd: bool) -> f64 {
    let w = (dt[0] + dt[2]).min(gt[0] + gt[2]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[1] + dt[3]).min(gt[1] + gt[3]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let dt_area = dt[2] * dt[3];
    let union = if iscrowd {
        dt_area
    } else {
        dt_area + gt[2] * gt[3] - inter
    };
    inter / union
}

/// One image's objects of one category, in input order (pycocotools' `_gts[img, cat]`,
/// `_dts[img, cat]`).
#[derive(Default)]
struct ImageCategory<'a> {
    gts: Vec<&'a GroundTruth>,
    dts: Vec<&'a Detection>,
}

/// One kept detection's outcome at every IoU threshold (a column of pycocotools' `dtMatches`,
/// `dtIgnore`).
#[derive(Clone, Copy)]
struct DtOutcome {
    score: f64,
    /// Matched a ground truth (`dtMatches != 0`).
    matched: [bool; T],
    /// Neither right nor wrong: matched an ignored gt, or unmatched and of another size class.
    ignored: [bool; T],
}

/// pycocotools' `evaluateImg` result for one image, category and area range (its `evalImgs`
/// entry).
struct EvalImg {
    /// The kept detections, highest score first.
    dts: Vec<DtOutcome>,
    /// Ground truths not ignored in this area range (`count_nonzero(gtIgnore == 0)`).
    num_gt_counted: usize,
}

/// Matches one image's detections of one category to its ground truth at every IoU threshold,
/// for one area range: pycocotools' `evaluateImg` with the detections already sorted and cut
/// (`dts`) and their IoU with `gts` in input order (`ious[d][g]`).
fn evaluate_img(
    gts: &[&GroundTruth],
    dts: &[&Detection],
    ious: &[Vec<f64>],
    area_range: [f64; 2],
    iou_thrs: &[f64; T],
) -> EvalImg {
    let outside = |area: f64| area < area_range[0] || area > area_range[1];
    let gt_ignore_unsorted: Vec<bool> = gts.iter().map(|g| g.iscrowd || outside(g.area)).collect();
    // Ignored ground truth last, so that a detection settles on a counted one first (stable,
    // as pycocotools' mergesort).
    let mut gt_order: Vec<usize> = (0..gts.len()).collect();
    gt_order.sort_by_key(|&g| gt_ignore_unsorted[g]);
    let gt_ignore: Vec<bool> = gt_order.iter().map(|&g| gt_ignore_unsorted[g]).collect();
    let gt_crowd: Vec<bool> = gt_order.iter().map(|&g| gts[g].iscrowd).collect();

    let mut outcomes: Vec<DtOutcome> = dts
        .iter()
        .map(|d| DtOutcome {
            score: d.score,
            matched: [false; T],
            ignored: [false; T],
        })
        .collect();
    for (t, &thr) in iou_thrs.iter().enumerate() {
        let mut gt_matched = vec![false; gts.len()];
        for (d, outcome) in outcomes.iter_mut().enumerate() {
            // A match needs IoU >= thr; capped below 1 so that a perfect box still matches.
            let mut best_iou = thr.min(1.0 - 1e-10);
            let mut best: Option<usize> = None;
            for (g, &gt) in gt_order.iter().enumerate() {
                // A crowd region takes any number of detections; any other gt one.
                if gt_matched[g] && !gt_crowd[g] {
                    continue;
                }
                // Matched to a counted gt: the ignored ones (all after it) cannot replace it.
                if best.is_some_and(|m| !gt_ignore[m]) && gt_ignore[g] {
                    break;
                }
                if ious[d][gt] < best_iou {
                    continue;
                }
                best_iou = ious[d][gt];
                best = Some(g);
            }
            if let Some(m) = best {
                outcome.ignored[t] = gt_ignore[m];
                outcome.matched[t] = true;
                gt_matched[m] = true;
            }
        }
    }
    // An unmatched detection of another size class is no false positive of this one.
    for (outcome, dt) in outcomes.iter_mut().zip(dts) {
        if outside(dt.bbox[2] * dt.bbox[3]) {
            for t in 0..T {
                outcome.ignored[t] |= !outcome.matched[t];
            }
        }
    }
    EvalImg {
        dts: outcomes,
        num_gt_counted: gt_ignore.iter().filter(|&&i| !i).count(),
    }
}

/// One category's accumulated curves: precision at each recall threshold `[a][m][t][r]` and the
/// recall reached `[a][m][t]`, -1 where the slice has no counted ground truth.
struct CategoryEval {
    precision: Vec<f64>,
    recall: Vec<f64>,
}

impl CategoryEval {
    fn precision_at(&self, a: usize, m: usize, t: usize) -> &[f64] {
        let start = ((a * M + m) * T + t) * R;
        &self.precision[start..start + R]
    }

    fn recall_at(&self, a: usize, m: usize, t: usize) -> f64 {
        self.recall[(a * M + m) * T + t]
    }
}

/// Evaluates one category over its images (ascending image order): `evaluateImg` per image and
/// area range, then `accumulate`.
fn evaluate_category(
    images: &BTreeMap<usize, ImageCategory>,
    iou_thrs: &[f64; T],
    rec_thrs: &[f64; R],
) -> CategoryEval {
    let max_det = MAX_DETS[M - 1];
    let mut per_area: Vec<Vec<EvalImg>> =
        (0..A).map(|_| Vec::with_capacity(images.len())).collect();
    for cell in images.values() {
        let mut dts = cell.dts.clone();
        dts.sort_by(|a, b| by_score_descending(a.score, b.score));
        dts.truncate(max_det);
        let ious: Vec<Vec<f64>> = dts
            .iter()
            .map(|d| {
                cell.gts
                    .iter()
                    .map(|g| bb_iou(&d.bbox, &g.bbox, g.iscrowd))
                    .collect()
            })
            .collect();
        for (a, (_, range)) in AREA_RANGES.iter().enumerate() {
            per_area[a].push(evaluate_img(&cell.gts, &dts, &ious, *range, iou_thrs));
        }
    }
    accumulate(&per_area, rec_thrs)
}

/// pycocotools' `accumulate` for one category: per area range (`per_area[a]`, the images'
/// `evaluate_img` results in image order) and detection limit, the detections of all images
/// ranked by score, the precision/recall curve at each IoU threshold, its precision made
/// monotone and read at the recall thresholds.
fn accumulate(per_area: &[Vec<EvalImg>], rec_thrs: &[f64; R]) -> CategoryEval {
    let mut precision = vec![-1.0; A * M * T * R];
    let mut recall = vec![-1.0; A * M * T];
    for (a, evals) in per_area.iter().enumerate() {
        let num_gt: usize = evals.iter().map(|e| e.num_gt_counted).sum();
        if num_gt == 0 {
            continue;
        }
        for (m, &max_det) in MAX_DETS.iter().enumerate() {
            // Each image's first max_det detections, images in order, then all by score
            // (stable: ties keep image order, then score order within the image).
            let mut ranked: Vec<DtOutcome> = evals
                .iter()
                .flat_map(|e| e.dts[..e.dts.len().min(max_det)].iter().copied())
                .collect();
            ranked.sort_by(|x, y| by_score_descending(x.score, y.score));
            for t in 0..T {
                let (mut tp, mut fp) = (0.0f64, 0.0f64);
                let mut rc = Vec::with_capacity(ranked.len());
                let mut pr = Vec::with_capacity(ranked.len());
                for dt in &ranked {
                    if !dt.ignored[t] {
                        if dt.matched[t] {
                            tp += 1.0;
                        } else {
                            fp += 1.0;
                        }
                    }
                    rc.push(tp / num_gt as f64);
                    pr.push(tp / (fp + tp + f64::EPSILON));
                }
                recall[(a * M + m) * T + t] = rc.last().copied().unwrap_or(0.0);
                // The interpolated precision: the best at this recall or any higher one.
                for i in (1..pr.len()).rev() {
                    if pr[i] > pr[i - 1] {
                        pr[i - 1] = pr[i];
                    }
                }
                let start = ((a * M + m) * T + t) * R;
                for (r, &rec_thr) in rec_thrs.iter().enumerate() {
                    // np.searchsorted(rc, rec_thr, side='left'); a recall never reached: 0.
                    let i = rc.partition_point(|&x| x < rec_thr);
                    precision[start + r] = pr.get(i).copied().unwrap_or(0.0);
                }
            }
        }
    }
    CategoryEval { precision, recall }
}

/// Mean of the values > -1, -1 if there are none (pycocotools' `_summarize`).
fn mean_measured(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .filter(|&v| v > -1.0)
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        -1.0
    } else {
        sum / n as f64
    }
}

/// The index of an area range by its label.
fn area_index(label: &str) -> usize {
    AREA_RANGES.iter().position(|(l, _)| *l == label).unwrap()
}

/// The index of a detection limit.
fn max_det_index(max_det: usize) -> usize {
    MAX_DETS.iter().position(|&m| m == max_det).unwrap()
}

/// pycocotools' `summarize` (`_summarizeDets`): the 12 stats, each the mean over all categories
/// of the measured precisions (AP) or recalls (AR) of its slice.
fn summarize(evals: &[CategoryEval], iou_thrs: &[f64; T]) -> [f64; 12] {
    let all_thresholds = 0..T;
    // pycocotools picks AP50 and AP75 by the threshold's value.
    let at = |thr: f64| {
        let t = iou_thrs.iter().position(|&t| t == thr).unwrap();
        t..t + 1
    };
    // AP: the precision curves of every category at these IoU thresholds, area and limit.
    let ap = |ts: std::ops::Range<usize>, a: usize, m: usize| {
        mean_measured(evals.iter().flat_map(|e| {
            ts.clone()
                .flat_map(move |t| e.precision_at(a, m, t).iter().copied())
        }))
    };
    // AR: the recall of every category at all IoU thresholds, this area and limit.
    let ar = |a: usize, m: usize| {
        mean_measured(
            evals
                .iter()
                .flat_map(|e| (0..T).map(move |t| e.recall_at(a, m, t))),
        )
    };
    let (all, small, medium, large) = (
        area_index("all"),
        area_index("small"),
        area_index("medium"),
        area_index("large"),
    );
    let m100 = max_det_index(100);
    [
        ap(all_thresholds.clone(), all, m100),
        ap(at(0.5), all, m100),
        ap(at(0.75), all, m100),
        ap(all_thresholds.clone(), small, m100),
        ap(all_thresholds.clone(), medium, m100),
        ap(all_thresholds, large, m100),
        ar(all, max_det_index(1)),
        ar(all, max_det_index(10)),
        ar(all, m100),
        ar(small, m100),
        ar(medium, m100),
        ar(large, m100),
    ]
}

/// Evaluates `dts` against `gts` on the images `image_ids` and the categories `category_ids`
/// (the ground-truth file's `images` and `categories`; duplicates are merged), as pycocotools'
/// `COCOeval(gt, gt.loadRes(dts), "bbox")` with `evaluate(); accumulate(); summarize()`.
/// Ground truths and detections on other images or categories are left out, as COCOeval leaves
/// them out. Order matters only where pycocotools' does: among equal scores, earlier detections
/// of an image count first. Runs categories in parallel (rayon).
pub fn evaluate(
    image_ids: &[i64],
    category_ids: &[i64],
    gts: &[GroundTruth],
    dts: &[Detection],
) -> CocoStats {
    let mut images = image_ids.to_vec();
    images.sort_unstable();
    images.dedup();
    let mut categories = category_ids.to_vec();
    categories.sort_unstable();
    categories.dedup();
    let image_index: HashMap<i64, usize> =
        images.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let category_index: HashMap<i64, usize> = categories
        .iter()
        .enumerate()
        .map(|(k, &id)| (id, k))
        .collect();

    // Per category, the images with any of its objects, in ascending id order: pycocotools
    // skips the others (`evaluateImg` returns None) and concatenates in this order.
    let mut cells: Vec<BTreeMap<usize, ImageCategory>> =
        (0..categories.len()).map(|_| BTreeMap::new()).collect();
    let locate = |image_id: i64, category_id: i64| {
        Some((
            *category_index.get(&category_id)?,
            *image_index.get(&image_id)?,
        ))
    };
    for gt in gts {
        if let Some((k, i)) = locate(gt.image_id, gt.category_id) {
            cells[k].entry(i).or_default().gts.push(gt);
        }
    }
    for dt in dts {
        if let Some((k, i)) = locate(dt.image_id, dt.category_id) {
            cells[k].entry(i).or_default().dts.push(dt);
        }
    }

    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    let evals: Vec<CategoryEval> = cells
        .par_iter()
        .map(|images| evaluate_category(images, &iou_thrs, &rec_thrs))
        .collect();

    let all = area_index("all");
    let m100 = max_det_index(100);
    let per_category_ap = categories
        .iter()
        .zip(&evals)
        .map(|(&id, e)| {
            let curves = (0..T).flat_map(|t| e.precision_at(all, m100, t).iter().copied());
            (id, mean_measured(curves))
        })
        .collect();
    CocoStats {
        stats: summarize(&evals, &iou_thrs),
        per_category_ap,
    }
}

/// Writes detections as a COCO results JSON array (image_id, category_id, bbox, score), the
/// file pycocotools' `loadRes` reads. Refuses non-finite numbers, which JSON cannot hold.
pub fn write_results(path: &Path, dts: &[Detection]) -> anyhow::Result<()> {
    for (i, d) in dts.iter().enumerate() {
        if !d.score.is_finite() || d.bbox.iter().any(|v| !v.is_finite()) {
            anyhow::bail!(
                "detection {i} (image {}, category {}) has a non-finite score or box \
                 (score {}, bbox {:?}); not writing {}",
                d.image_id,
                d.category_id,
                d.score,
                d.bbox,
                path.display()
            );
        }
    }
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot create the results file {}", path.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut writer, dts)
        .with_context(|| format!("cannot write the results file {}", path.display()))?;
    std::io::Write::flush(&mut writer)
        .with_context(|| format!("cannot write the results file {}", path.display()))
}
