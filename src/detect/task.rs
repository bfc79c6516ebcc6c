//! Detection, the third task of the engine: Faster R-CNN trained with the same optimizer,
//! schedule, precision, checkpoints, resume and data parallelism as the other tasks, and the same
//! output files (`config.toml`, `metrics.jsonl`, `checkpoints/`, `best.safetensors`,
//! `summary.json`, `tb/`).
//!
//! The loss is torchvision's: the sum of the RPN's objectness and box losses and the RoI heads'
//! classifier and box losses, each also in `metrics.jsonl` (`train_loss_objectness`, …). The
//! evaluation is COCO's ([`super::coco_eval`]) over the whole validation split; "best" is the
//! epoch with the highest mAP@[.5:.95]. Figures are in % (0–100), like top-1.

use super::coco_eval::{self, CocoStats, GroundTruth};
use super::dataset::{DetDataset, Format};
use super::loader::{self, DetBatch, DetLoader, LoaderOptions};
use super::model::{freeze_backbone, FasterRcnn, FasterRcnnOptions, Target};
use super::transforms::CropOptions;
use crate::checkpoint;
use crate::config::{Config, Task as TaskKind};
use crate::data::Shard;
use crate::device::upload;
use crate::engine::{
    self, BackboneLr, EpochFields, Evaluation, MetricsLine, Opened, Run, RunOptions, RunTotals,
    StepContext, StepOutput, Summary, Task, TrainFigures,
};
use crate::metrics;
use crate::model::{ModelSpec, ResNet};
use crate::train::derive_seed;
use crate::train::precision::Autocast;
use crate::train::DataParallel;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};

/// Prefix of the backbone's variables (torchvision's names: `backbone.body.layer1.0.conv1…`).
pub const BACKBONE_PREFIX: &str = "backbone.body.";

/// The names of the four loss terms, in [`StepOutput::parts`] order (torchvision's keys).
pub const LOSS_TERMS: [&str; 4] = [
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
];

/// The detection figures of a `metrics.jsonl` line: the epoch's mean of each loss term, and on
/// evaluated epochs COCO's figures (%).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetectionEpoch {
    pub train_loss_objectness: f64,
    pub train_loss_rpn_box_reg: f64,
    pub train_loss_classifier: f64,
    pub train_loss_box_reg: f64,
    /// AP@[.5:.95] (COCO's mAP), AP at IoU 0.5 and 0.75, AP of small, medium and large objects.
    pub val_map: Option<f64>,
    pub val_ap50: Option<f64>,
    pub val_ap75: Option<f64>,
    pub val_ap_small: Option<f64>,
    pub val_ap_medium: Option<f64>,
    pub val_ap_large: Option<f64>,
}

impl EpochFields for DetectionEpoch {
    fn describe_train(&self) -> String {
        format!(
            "(objectness {:.4} rpn box {:.4} classifier {:.4} box {:.4})",
            self.train_loss_objectness,
            self.train_loss_rpn_box_reg,
            self.train_loss_classifier,
            self.train_loss_box_reg
        )
    }
    fn describe_eval(&self) -> Option<String> {
        let (map, ap50) = (self.val_map?, self.val_ap50?);
        Some(format!("mAP {map:.2}% AP50 {ap50:.2}%"))
    }
}

/// One line of a detection run's `metrics.jsonl`.
pub type DetEpochMetrics = MetricsLine<DetectionEpoch>;

/// The detection figures of `summary.json` (%).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetectionSummary {
    /// Highest validation mAP and that epoch's AP50.
    pub best_map: f64,
    pub best_ap50: f64,
    pub final_map: f64,
    pub final_ap50: f64,
    pub final_ap75: f64,
    pub final_ap_small: f64,
    pub final_ap_medium: f64,
    pub final_ap_large: f64,
    /// AP@[.5:.95] per class at the last evaluation (classes without a validation object are
    /// left out).
    pub final_class_ap: BTreeMap<String, f64>,
}

/// What a finished detection run reports (also `summary.json`).
pub type DetSummary = Summary<DetectionSummary>;

/// COCO's evaluation of a detector over a whole split.
#[derive(Debug, Clone)]
pub struct DetEval {
    /// pycocotools' twelve figures (fractions, -1 where undefined) and per-category AP.
    pub coco: CocoStats,
    /// The class of each category id of `coco.per_category_ap` (label k is class k-1).
    pub classes: Vec<String>,
    pub images: usize,
    pub detections: usize,
}

impl DetEval {
    /// A COCO figure in %, 0 where COCO leaves it undefined (-1: no object of that size).
    fn percent(v: f64) -> f64 {
        if v < 0.0 {
            0.0
        } else {
            100.0 * v
        }
    }
    pub fn map(&self) -> f64 {
        Self::percent(self.coco.stats[0])
    }
    pub fn ap50(&self) -> f64 {
        Self::percent(self.coco.stats[1])
    }
    pub fn ap75(&self) -> f64 {
        Self::percent(self.coco.stats[2])
    }
    pub fn ap_small(&self) -> f64 {
        Self::percent(self.coco.stats[3])
    }
    pub fn ap_medium(&self) -> f64 {
        Self::percent(self.coco.stats[4])
    }
    pub fn ap_large(&self) -> f64 {
        Self::percent(self.coco.stats[5])
    }

    /// AP@[.5:.95] per class name (%), for the classes with validation objects.
    pub fn class_ap(&self) -> BTreeMap<String, f64> {
        self.coco
            .per_category_ap
            .iter()
            .filter(|(_, ap)| *ap >= 0.0)
            .filter_map(|&(id, ap)| {
                let name = self.classes.get((id - 1) as usize)?;
                Some((name.clone(), 100.0 * ap))
            })
            .collect()
    }

    /// pycocotools' summary, its twelve lines.
    pub fn report(&self) -> String {
        const LINES: [&str; 12] = [
            "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]",
            "AP @[IoU=0.50      | area=   all | maxDets=100]",
            "AP @[IoU=0.75      | area=   all | maxDets=100]",
            "AP @[IoU=0.50:0.95 | area= small | maxDets=100]",
            "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
            "AP @[IoU=0.50:0.95 | area= large | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
            "AR @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
            "AR @[IoU=0.50:0.95 | area=   all | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area= small | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
            "AR @[IoU=0.50:0.95 | area= large | maxDets=100]",
        ];
        LINES
            .iter()
            .zip(self.coco.stats)
            .map(|(l, v)| format!(" {l} = {v:.3}\n"))
            .collect()
    }
}

impl Evaluation for DetEval {
    fn headline(&self) -> f64 {
        self.map()
    }
    fn loss(&self) -> Option<f64> {
        None
    }
}

/// Reads a detection run's `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<DetEpochMetrics>> {
    metrics::read(path)
}

/// Trains a detector as the config says (`task = "detection"`), writing everything into
/// `opts.out_dir`; `opts.resume` continues from the newest valid checkpoint there.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<DetSummary> {
    if cfg.task != TaskKind::Detection {
        bail!("detect::train needs a config with task = \"detection\"");
    }
    engine::train::<Detection>(cfg, opts)
}

/// The model's options from `[detect]` and `data.mean` / `data.std`.
pub fn model_options(cfg: &Config) -> FasterRcnnOptions {
    let d = &cfg.detect;
    FasterRcnnOptions {
        // Evaluation's size (training draws its own per image in the loader).
        min_size: *d
            .min_size
            .last()
            .expect("validated: detect.min_size is not empty"),
        max_size: d.max_size,
        image_mean: cfg.data.mean,
        image_std: cfg.data.std,
        // One size per pyramid level, the same ratios on every level.
        anchor_sizes: d.anchor_sizes.iter().map(|&s| vec![s]).collect(),
        aspect_ratios: vec![d.aspect_ratios.clone(); d.anchor_sizes.len()],
        rpn_pre_nms_top_n_train: d.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test: d.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train: d.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test: d.rpn_post_nms_top_n_test,
        rpn_nms_thresh: d.rpn_nms_thresh,
        rpn_fg_iou_thresh: d.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh: d.rpn_bg_iou_thresh,
        rpn_batch_size_per_image: d.rpn_batch_size_per_image,
        rpn_positive_fraction: d.rpn_positive_fraction,
        rpn_score_thresh: d.rpn_score_thresh,
        box_score_thresh: d.box_score_thresh,
        box_nms_thresh: d.box_nms_thresh,
        box_detections_per_img: d.box_detections_per_img,
        box_fg_iou_thresh: d.box_fg_iou_thresh,
        box_bg_iou_thresh: d.box_bg_iou_thresh,
        box_batch_size_per_image: d.box_batch_size_per_image,
        box_positive_fraction: d.box_positive_fraction,
        frozen_bn: d.frozen_bn,
        trainable_layers: d.trainable_layers,
        ..FasterRcnnOptions::default()
    }
}

/// The loader's options from the config.
fn loader_options(cfg: &Config, batch_size: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        workers: cfg.data.workers,
        hflip_prob: if cfg.data.flip { 0.5 } else { 0.0 },
        min_sizes: cfg.detect.min_size.clone(),
        crop: cfg.detect.crop.then(|| CropOptions {
            min_scale: cfg.detect.crop_min_scale,
            ..Default::default()
        }),
    }
}

/// Opens both splits of `[data]` / `[detect]` and checks that they name the same classes.
pub fn open_train_val(cfg: &Config) -> Result<(Arc<DetDataset>, Arc<DetDataset>)> {
    let root = Path::new(&cfg.data.dir);
    let format = Format::of(cfg.data.format, root)?;
    let train = DetDataset::open(format, root, &cfg.detect.train_split)?;
    let val = DetDataset::open(format, root, &cfg.detect.val_split)?;
    if train.classes != val.classes {
        bail!(
            "{}: the {} split names {} classes and the {} split {}; they must be the same list",
            root.display(),
            cfg.detect.train_split,
            train.classes.len(),
            cfg.detect.val_split,
            val.classes.len()
        );
    }
    if train.is_empty() {
        bail!(
            "{}: the {} split has no images",
            root.display(),
            cfg.detect.train_split
        );
    }
    Ok((Arc::new(train), Arc::new(val)))
}

/// Initialises the backbone from `detect.backbone`: a classification checkpoint of this project
/// (or a timm / torchvision ResNet state dict as safetensors) of the config's architecture. Every
/// backbone tensor must be there with its shape (the error names the tensor); its classifier is
/// skipped. A no-op when the key is "".
pub fn load_backbone(vs: &nn::VarStore, cfg: &Config) -> Result<()> {
    if cfg.detect.backbone.is_empty() {
        return Ok(());
    }
    let path = Path::new(&cfg.detect.backbone);
    let ckpt = checkpoint::load(path).context("key `detect.backbone`")?;
    if let Some(c) = &ckpt.config {
        if c.model.name != cfg.model.name || c.model.variant != cfg.model.variant {
            bail!(
                "key `detect.backbone`: {} is a {} variant {} but the config's backbone is {} variant {} (set `model.name` / `model.variant` to match)",
                path.display(),
                c.model.name,
                c.model.variant,
                cfg.model.name,
                cfg.model.variant
            );
        }
    }
    // A detection checkpoint holds the backbone under its prefix; a classification one at the
    // root, with its classifier.
    let strip = ckpt.tensors.keys().any(|k| k.starts_with(BACKBONE_PREFIX));
    let tensors: BTreeMap<String, Tensor> = ckpt
        .model_tensors()
        .filter_map(|(k, v)| {
            let name = match strip {
                true => k.strip_prefix(BACKBONE_PREFIX)?,
                false => k.as_str(),
            };
            (!name.starts_with("fc.")).then(|| (name.to_string(), v.shallow_clone()))
        })
        .collect();
    // Checked against a backbone of its own (names, shapes, nothing missing or extra), then
    // copied under the prefix.
    let spec = ModelSpec::from_config(&cfg.model)?;
    let staging = nn::VarStore::new(Device::Cpu);
    let _ = ResNet::backbone(&staging.root(), &spec, 32);
    checkpoint::copy_into(&staging, &tensors, path, None).context("key `detect.backbone`")?;
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, t) in staging.variables() {
            let full = format!("{BACKBONE_PREFIX}{name}");
            match vars.get(&full) {
                Some(v) => v.shallow_clone().copy_(&t.to_device(v.device())),
                None => {
                    bail!("the detector has no variable {full} (is model.name the checkpoint's?)")
                }
            }
        }
        Ok(())
    })
}

/// A detection run: its data and its model.
pub struct Detection {
    cfg: Config,
    train_ds: Arc<DetDataset>,
    val_ds: Arc<DetDataset>,
    net: Option<FasterRcnn>,
    device: Device,
    shard: Shard,
}

impl Detection {
    fn net(&self) -> &FasterRcnn {
        self.net
            .as_ref()
            .expect("the model is built before training")
    }
}

/// A batch's images and targets on the device.
fn to_device(batch: &DetBatch, device: Device) -> (Vec<Tensor>, Vec<Target>) {
    let images = batch.images.iter().map(|x| upload(x, device)).collect();
    let targets = batch
        .targets
        .iter()
        .map(|t| Target {
            boxes: upload(&t.boxes, device),
            labels: upload(&t.labels, device),
        })
        .collect();
    (images, targets)
}

impl Task for Detection {
    type Batch = DetBatch;
    type Batches = DetLoader;
    type Eval = DetEval;
    type EpochFields = DetectionEpoch;
    type SummaryFields = DetectionSummary;

    fn open(run: &Run) -> Result<Opened<Self>> {
        let (train_ds, val_ds) = open_train_val(run.cfg)?;
        if train_ds.dropped() + val_ds.dropped() > 0 {
            run.log(&format!(
                "{} zero-size boxes dropped from the annotations (as COCO does)",
                train_ds.dropped() + val_ds.dropped()
            ));
        }
        Ok(Opened {
            classes: train_ds.classes.clone(),
            train_len: train_ds.len(),
            task: Detection {
                cfg: run.cfg.clone(),
                train_ds,
                val_ds,
                net: None,
                device: run.device,
                shard: run.shard,
            },
        })
    }

    fn build_model(&mut self, root: &nn::Path) -> Result<()> {
        let spec = ModelSpec::from_config(&self.cfg.model)?;
        let num_classes = self.train_ds.classes.len() as i64 + 1;
        self.net = Some(FasterRcnn::new(
            root,
            &spec,
            num_classes,
            model_options(&self.cfg),
        )?);
        Ok(())
    }

    fn init_weights(&mut self, vs: &nn::VarStore, _run: &Run) -> Result<()> {
        freeze_backbone(vs, &model_options(&self.cfg));
        Ok(())
    }

    fn backbone_lr_mult(&self, _run: &Run) -> Option<BackboneLr> {
        let mult = self.cfg.detect.backbone_lr_mult;
        (mult != 1.0).then_some(BackboneLr {
            is_backbone: |name| name.starts_with(BACKBONE_PREFIX),
            mult,
        })
    }

    fn on_fresh_start(
        &mut self,
        vs: &nn::VarStore,
        _opt: &mut crate::train::optim::Optimizer,
        run: &Run,
    ) -> Result<()> {
        load_backbone(vs, &self.cfg)?;
        if !self.cfg.detect.backbone.is_empty() {
            run.log(&format!(
                "backbone initialised from {}; FPN, RPN and RoI heads start at random",
                self.cfg.detect.backbone
            ));
        }
        Ok(())
    }

    fn train_batches(&self, _run: &Run, epoch: usize, first: usize) -> Result<DetLoader> {
        let opts = loader_options(&self.cfg, self.cfg.train.batch_size);
        Ok(loader::train_loader(
            self.train_ds.clone(),
            &opts,
            self.cfg.seed,
            epoch,
            first,
            self.shard,
        ))
    }

    fn train_step(&self, batch: &DetBatch, ctx: &StepContext) -> Result<StepOutput> {
        let cfg = &self.cfg;
        let (images, targets) = to_device(batch, self.device);
        // The samplers' draws come from the step and the image's place in the global batch, so
        // a resumed run and a data-parallel one draw what a single process would.
        let first = ctx.dp.map_or(0, |dp| dp.rank()) * batch.len();
        let step = ctx.at.global_step as u64;
        let mut rngs: Vec<ChaCha8Rng> = (0..batch.len())
            .map(|i| {
                ChaCha8Rng::seed_from_u64(derive_seed(
                    cfg.seed,
                    "detect-sampler",
                    step,
                    (first + i) as u64,
                ))
            })
            .collect();
        let losses = {
            let _ac = Autocast::enter(cfg.train.precision, self.device);
            self.net()
                .losses(&images, &batch.min_sizes, &targets, &mut rngs)
        };
        let parts = vec![
            losses.objectness.to_kind(Kind::Float),
            losses.rpn_box_reg.to_kind(Kind::Float),
            losses.classifier.to_kind(Kind::Float),
            losses.box_reg.to_kind(Kind::Float),
        ];
        let loss = parts
            .iter()
            .fold(Tensor::zeros([], (Kind::Float, self.device)), |a, b| a + b);
        Ok(StepOutput {
            loss,
            hits: Tensor::zeros([], (Kind::Int64, self.device)),
            samples: batch.len() as i64,
            counted: 0,
            parts,
        })
    }

    fn evaluate(&self, _run: &Run, dp: Option<&DataParallel>) -> Result<DetEval> {
        let opts = loader_options(&self.cfg, self.cfg.detect.eval_batch_size);
        let batches = loader::eval_loader(self.val_ds.clone(), &opts, self.shard);
        evaluate(
            self.net(),
            batches,
            &self.val_ds,
            self.device,
            self.cfg.train.precision,
            dp,
        )
    }

    fn epoch_fields(&self, train: &TrainFigures, eval: Option<&DetEval>) -> DetectionEpoch {
        let part = |i: usize| train.loss_parts.get(i).copied().unwrap_or(0.0);
        DetectionEpoch {
            train_loss_objectness: part(0),
            train_loss_rpn_box_reg: part(1),
            train_loss_classifier: part(2),
            train_loss_box_reg: part(3),
            val_map: eval.map(|e| e.map()),
            val_ap50: eval.map(|e| e.ap50()),
            val_ap75: eval.map(|e| e.ap75()),
            val_ap_small: eval.map(|e| e.ap_small()),
            val_ap_medium: eval.map(|e| e.ap_medium()),
            val_ap_large: eval.map(|e| e.ap_large()),
        }
    }

    fn summary_fields(&self, run: &Run, t: &RunTotals, last: &DetEval) -> DetectionSummary {
        let best_ap50 = engine::epoch_fields_at::<DetectionEpoch>(&run.metrics_path, t.best_epoch)
            .and_then(|m| m.val_ap50)
            .unwrap_or(last.ap50());
        DetectionSummary {
            best_map: t.best,
            best_ap50,
            final_map: last.map(),
            final_ap50: last.ap50(),
            final_ap75: last.ap75(),
            final_ap_small: last.ap_small(),
            final_ap_medium: last.ap_medium(),
            final_ap_large: last.ap_large(),
            final_class_ap: last.class_ap(),
        }
    }

    fn train_accuracy_name(&self) -> &'static str {
        ""
    }
}

/// The detections of one image: dataset index, then per box (x1, y1, x2, y2, score, label).
type ImageDetections = (usize, Vec<[f64; 6]>);

/// Runs the detector over `batches` and evaluates its detections against `ds`'s annotations
/// with COCO's protocol; in a data-parallel run every rank's detections are gathered first, so
/// every rank returns the figures of the whole split.
pub fn evaluate(
    net: &FasterRcnn,
    batches: DetLoader,
    ds: &DetDataset,
    device: Device,
    precision: crate::config::Precision,
    dp: Option<&DataParallel>,
) -> Result<DetEval> {
    let mut found: Vec<ImageDetections> = Vec::new();
    for batch in batches {
        let batch = batch?;
        let (images, _) = to_device(&batch, device);
        let dets = tch::no_grad(|| {
            let _ac = Autocast::enter(precision, device);
            net.detect(&images)
        });
        for (&index, d) in batch.indices.iter().zip(&dets) {
            found.push((index, detections_to_rows(&d.boxes, &d.scores, &d.labels)?));
        }
    }
    if let Some(dp) = dp {
        found = gather(found, dp)?;
    }
    Ok(coco_evaluation(ds, &found))
}

/// A detection's tensors as rows (x1, y1, x2, y2, score, label).
fn detections_to_rows(boxes: &Tensor, scores: &Tensor, labels: &Tensor) -> Result<Vec<[f64; 6]>> {
    let b = Vec::<f64>::try_from(boxes.to_kind(Kind::Double).flatten(0, -1))?;
    let s = Vec::<f64>::try_from(scores.to_kind(Kind::Double))?;
    let l = Vec::<i64>::try_from(labels.to_kind(Kind::Int64))?;
    Ok((0..s.len())
        .map(|i| {
            [
                b[4 * i],
                b[4 * i + 1],
                b[4 * i + 2],
                b[4 * i + 3],
                s[i],
                l[i] as f64,
            ]
        })
        .collect())
}

/// Every rank's detections, on every rank: the counts first, then the rows, each rank writing
/// its own slice of a zero buffer that a sum over the ranks fills.
fn gather(mine: Vec<ImageDetections>, dp: &DataParallel) -> Result<Vec<ImageDetections>> {
    let (rank, world) = (dp.rank(), dp.world_size());
    // One record per detection: image index, then the six values; an image without detections
    // still sends one record with a NaN score so that it is known to have been evaluated.
    let mut rows: Vec<f64> = Vec::new();
    for (index, dets) in &mine {
        if dets.is_empty() {
            rows.extend([*index as f64, 0.0, 0.0, 0.0, 0.0, f64::NAN, 0.0]);
        }
        for d in dets {
            rows.push(*index as f64);
            rows.extend(d);
        }
    }
    let mut counts = vec![0.0; world];
    counts[rank] = rows.len() as f64;
    let counts = dp.sum(&counts)?;
    let offset: usize = counts[..rank].iter().map(|&c| c as usize).sum();
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    let mut all = vec![0.0; total];
    all[offset..offset + rows.len()].copy_from_slice(&rows);
    // NaN would poison the sum: the marker travels as an infinite score and is restored here.
    for v in all.iter_mut() {
        if v.is_nan() {
            *v = f64::INFINITY;
        }
    }
    let all = dp.sum(&all)?;
    let mut by_image: BTreeMap<usize, Vec<[f64; 6]>> = BTreeMap::new();
    for r in all.chunks_exact(7) {
        let entry = by_image.entry(r[0] as usize).or_default();
        if r[5].is_finite() {
            entry.push([r[1], r[2], r[3], r[4], r[5], r[6]]);
        }
    }
    Ok(by_image.into_iter().collect())
}

/// COCO's evaluation of `found` against every annotated object of `ds` (images are the
/// dataset's indices, categories its labels 1..=K).
fn coco_evaluation(ds: &DetDataset, found: &[ImageDetections]) -> DetEval {
    let image_ids: Vec<i64> = (0..ds.len() as i64).collect();
    let category_ids: Vec<i64> = (1..=ds.classes.len() as i64).collect();
    let gts: Vec<GroundTruth> = ds
        .samples
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.objects.iter().map(move |o| GroundTruth {
                image_id: i as i64,
                category_id: o.label,
                bbox: xywh(&o.bbox.map(f64::from)),
                area: o.area as f64,
                iscrowd: o.iscrowd,
            })
        })
        .collect();
    let dts: Vec<coco_eval::Detection> = found
        .iter()
        .flat_map(|(i, rows)| {
            rows.iter().map(move |r| coco_eval::Detection {
                image_id: *i as i64,
                category_id: r[5] as i64,
                bbox: xywh(&[r[0], r[1], r[2], r[3]]),
                score: r[4],
            })
        })
        .collect();
    DetEval {
        coco: coco_eval::evaluate(&image_ids, &category_ids, &gts, &dts),
        classes: ds.classes.clone(),
        images: found.len(),
        detections: dts.len(),
    }
}

/// (x1, y1, x2, y2) → COCO's (x, y, w, h).
fn xywh(b: &[f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}
