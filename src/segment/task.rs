//! Segmentation, the second task of the engine: an FCN trained with the same optimizer,
//! schedule, precision, checkpoints, resume and data parallelism as classification, and the same
//! output files (`config.toml`, `metrics.jsonl`, `checkpoints/epoch-NNNN.safetensors`,
//! `best.safetensors`, `summary.json`).
//!
//! The loss is the pixel-wise cross entropy averaged over the labelled pixels of the global batch
//! (void pixels, `segment.ignore_index`, count nowhere). "Best" is the epoch with the highest val
//! mIoU. Metrics are named as what they are: `train_pixel_acc`, `val_pixel_acc`, `val_miou` (%).

use super::dataset::{self, SegDataset};
use super::loader::{SegBatch, SegLoader};
use super::metrics::{batch_counts, ConfusionMatrix};
use super::model::{load_backbone, SegModel, HEAD_PREFIX};
use crate::config::{Config, Precision, Task as TaskKind};
use crate::data::Shard;
use crate::device::{to_device_input, upload};
use crate::engine::{
    self, BackboneLr, EpochFields, Evaluation, MetricsLine, Opened, Run, RunOptions, RunTotals,
    StepContext, StepOutput, Summary, Task, TaskBatch, TrainFigures,
};
use crate::metrics;
use crate::train::derive_seed;
use crate::train::optim::Optimizer;
use crate::train::precision::Autocast;
use crate::train::DataParallel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

/// The segmentation figures of a `metrics.jsonl` line (%). Older files, which named the
/// validation figures `miou` and `pixel_acc` (and repeated them as `val_top1` and `val_top5`),
/// still read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentationEpoch {
    /// Pixel accuracy on the training crops.
    #[serde(alias = "train_top1")]
    pub train_pixel_acc: f64,
    #[serde(alias = "pixel_acc")]
    pub val_pixel_acc: Option<f64>,
    #[serde(alias = "miou")]
    pub val_miou: Option<f64>,
}

impl EpochFields for SegmentationEpoch {
    fn describe_train(&self) -> String {
        format!("pixel acc {:.2}%", self.train_pixel_acc)
    }
    fn describe_eval(&self) -> Option<String> {
        let (a, iou) = (self.val_pixel_acc?, self.val_miou?);
        Some(format!("pixel acc {a:.2}% mIoU {iou:.2}%"))
    }
}

/// One line of a segmentation run's `metrics.jsonl`.
pub type SegEpochMetrics = MetricsLine<SegmentationEpoch>;

/// The segmentation figures of `summary.json` (%).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentationSummary {
    /// Highest validation mIoU and that epoch's pixel accuracy.
    pub best_miou: f64,
    pub best_pixel_acc: f64,
    pub final_miou: f64,
    pub final_pixel_acc: f64,
}

/// What a finished segmentation run reports (also `summary.json`).
pub type SegSummary = Summary<SegmentationSummary>;

/// The evaluation of a segmentation model over a whole split.
#[derive(Debug, Clone, PartialEq)]
pub struct SegEval {
    /// Mean cross entropy over the labelled pixels.
    pub loss: f64,
    /// Pixel accuracy and mean IoU (%), from the confusion matrix of the whole split.
    pub pixel_acc: f64,
    pub miou: f64,
    /// Per-class IoU (%); `None` for classes absent from both ground truth and prediction.
    pub iou: Vec<Option<f64>>,
    pub confusion: ConfusionMatrix,
    pub images: usize,
}

impl Evaluation for SegEval {
    fn headline(&self) -> f64 {
        self.miou
    }
    fn loss(&self) -> Option<f64> {
        Some(self.loss)
    }
}

/// Summed pixel cross entropy over the labelled pixels (computed in f32).
fn pixel_ce_sum(logits: &Tensor, masks: &Tensor, ignore: i64) -> Tensor {
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        masks,
        None,
        Reduction::Sum,
        ignore,
        0.0,
    )
}

/// Labelled (non-void) pixels of a mask batch.
fn labelled(masks: &Tensor, ignore: i64) -> i64 {
    masks.ne(ignore).sum(Kind::Int64).int64_value(&[])
}

/// Loss, pixel accuracy and mIoU of a model over a loader.
pub fn evaluate(
    model: &SegModel,
    loader: SegLoader,
    device: Device,
    precision: Precision,
    channels_last: bool,
    ignore: i64,
) -> Result<SegEval> {
    let sums = EvalSums::over(model, loader, device, precision, channels_last, ignore)?;
    sums.result(model.num_classes as usize)
}

/// The sums of an evaluation pass (summable over the ranks of a data-parallel run): the
/// confusion counts, the summed loss, the labelled pixels and the images.
struct EvalSums {
    counts: Vec<f64>,
    loss: f64,
    pixels: f64,
    images: f64,
}

impl EvalSums {
    fn over(
        model: &SegModel,
        loader: SegLoader,
        device: Device,
        precision: Precision,
        channels_last: bool,
        ignore: i64,
    ) -> Result<EvalSums> {
        let k = model.num_classes;
        // The sums stay on the device until the end: a read per batch would stall a GPU's queue.
        let mut counts = Tensor::zeros([k * k], (Kind::Int64, device));
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let (mut pixels, mut images) = (0i64, 0usize);
        for batch in loader {
            let batch = batch?;
            let x = to_device_input(&batch.images, device, channels_last);
            let y = upload(&batch.masks, device);
            let logits = tch::no_grad(|| {
                let _ac = Autocast::enter(precision, device);
                model.forward_t(&x, false)
            })
            .to_kind(Kind::Float);
            loss_sum += tch::no_grad(|| pixel_ce_sum(&logits, &y, ignore)).to_kind(Kind::Double);
            pixels += labelled(&batch.masks, ignore);
            counts += batch_counts(&y, &logits.argmax(1, false), k);
            images += batch.len();
        }
        Ok(EvalSums {
            counts: Vec::<i64>::try_from(&counts)?
                .into_iter()
                .map(|c| c as f64)
                .collect(),
            loss: f64::try_from(&loss_sum)?,
            pixels: pixels as f64,
            images: images as f64,
        })
    }

    fn all_ranks(self, dp: Option<&DataParallel>) -> Result<EvalSums> {
        let Some(dp) = dp else { return Ok(self) };
        let mut v = self.counts;
        v.extend([self.loss, self.pixels, self.images]);
        let mut v = dp.sum(&v)?;
        let tail = v.split_off(v.len() - 3);
        Ok(EvalSums {
            counts: v,
            loss: tail[0],
            pixels: tail[1],
            images: tail[2],
        })
    }

    fn result(self, k: usize) -> Result<SegEval> {
        if self.images == 0.0 {
            bail!("the evaluation split has no images");
        }
        let counts: Vec<i64> = self.counts.iter().map(|&c| c as i64).collect();
        let mut cm = ConfusionMatrix::new(k);
        cm.add_counts(&Tensor::from_slice(&counts));
        Ok(SegEval {
            loss: self.loss / self.pixels.max(1.0),
            pixel_acc: cm.pixel_accuracy(),
            miou: cm.mean_iou(),
            iou: cm.iou(),
            confusion: cm,
            images: self.images as usize,
        })
    }
}

/// Reads a segmentation run's `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<SegEpochMetrics>> {
    metrics::read(path)
}

/// Trains an FCN as the config says (`task = "segmentation"`), writing everything into
/// `opts.out_dir`; `opts.resume` continues from the newest valid checkpoint there.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<SegSummary> {
    if cfg.task != TaskKind::Segmentation {
        bail!("segment::train needs a config with task = \"segmentation\"");
    }
    engine::train::<Segmentation>(cfg, opts)
}

impl TaskBatch for SegBatch {
    fn len(&self) -> usize {
        SegBatch::len(self)
    }
}

/// A segmentation run: its data and its model.
pub struct Segmentation {
    cfg: Config,
    train_ds: Arc<SegDataset>,
    val_ds: Arc<SegDataset>,
    net: Option<SegModel>,
    device: Device,
    shard: Shard,
}

impl Segmentation {
    fn net(&self) -> &SegModel {
        self.net
            .as_ref()
            .expect("the model is built before training")
    }
}

impl Task for Segmentation {
    type Batch = SegBatch;
    type Batches = SegLoader;
    type Eval = SegEval;
    type EpochFields = SegmentationEpoch;
    type SummaryFields = SegmentationSummary;

    fn open(run: &Run) -> Result<Opened<Self>> {
        let (train_ds, val_ds) = dataset::open_train_val(run.cfg)?;
        Ok(Opened {
            classes: super::class_names(run.cfg),
            train_len: train_ds.len(),
            task: Segmentation {
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
        self.net = Some(SegModel::new(root, &self.cfg)?);
        Ok(())
    }

    fn backbone_lr_mult(&self, _run: &Run) -> Option<BackboneLr> {
        let mult = self.cfg.segment.backbone_lr_mult;
        (mult != 1.0).then_some(BackboneLr {
            is_backbone: |name| !name.starts_with(HEAD_PREFIX),
            mult,
        })
    }

    fn on_fresh_start(&mut self, vs: &nn::VarStore, _opt: &mut Optimizer, run: &Run) -> Result<()> {
        load_backbone(vs, &self.cfg)?;
        if !self.cfg.segment.backbone.is_empty() {
            run.log(&format!(
                "backbone initialised from {}; the head starts at random",
                self.cfg.segment.backbone
            ));
        }
        Ok(())
    }

    fn train_batches(&self, _run: &Run, epoch: usize, first: usize) -> Result<SegLoader> {
        let (cfg, bs, shard) = (&self.cfg, self.cfg.train.batch_size, self.shard);
        let ds = self.train_ds.clone();
        Ok(SegLoader::train_shard(
            ds, cfg, bs, cfg.seed, epoch, first, shard,
        ))
    }

    fn train_step(&self, batch: &SegBatch, ctx: &StepContext) -> Result<StepOutput> {
        let cfg = &self.cfg;
        let ignore = cfg.segment.ignore_index;
        let x = to_device_input(&batch.images, self.device, cfg.train.channels_last);
        let y = upload(&batch.masks, self.device);
        let n_labelled = labelled(&batch.masks, ignore);
        // The mean over the labelled pixels of the global batch: each rank divides its sum by
        // the global count over the ranks (whose gradients are then averaged).
        let per_rank = match ctx.dp {
            Some(dp) => dp.sum(&[n_labelled as f64])?[0].max(1.0) / dp.world_size() as f64,
            None => n_labelled.max(1) as f64,
        };
        // Dropout draws from libtorch's generator: seed it per step so a resume replays them.
        let rank = ctx.dp.map_or(0, |dp| dp.rank() as u64);
        let step = ctx.at.global_step as u64;
        tch::manual_seed(derive_seed(cfg.seed, "segment-dropout", step, rank) as i64);
        let (logits, loss) = {
            let _ac = Autocast::enter(cfg.train.precision, self.device);
            let logits = self.net().forward_t(&x, true);
            let loss = pixel_ce_sum(&logits, &y, ignore) / per_rank;
            (logits, loss)
        };
        let hits = tch::no_grad(|| {
            logits
                .argmax(1, false)
                .eq_tensor(&y)
                .logical_and(&y.ne(ignore))
                .sum(Kind::Int64)
        });
        Ok(StepOutput {
            loss,
            hits,
            samples: batch.len() as i64,
            counted: n_labelled as usize,
            parts: Vec::new(),
        })
    }

    fn evaluate(&self, _run: &Run, dp: Option<&DataParallel>) -> Result<SegEval> {
        let (cfg, bs) = (&self.cfg, self.cfg.train.batch_size);
        let loader = SegLoader::eval_shard(self.val_ds.clone(), cfg, bs, self.shard);
        let (precision, cl) = (cfg.train.precision, cfg.train.channels_last);
        let ignore = cfg.segment.ignore_index;
        EvalSums::over(self.net(), loader, self.device, precision, cl, ignore)?
            .all_ranks(dp)?
            .result(self.net().num_classes as usize)
    }

    fn epoch_fields(&self, train: &TrainFigures, eval: Option<&SegEval>) -> SegmentationEpoch {
        SegmentationEpoch {
            train_pixel_acc: train.accuracy,
            val_pixel_acc: eval.map(|e| e.pixel_acc),
            val_miou: eval.map(|e| e.miou),
        }
    }

    fn summary_fields(&self, run: &Run, t: &RunTotals, last: &SegEval) -> SegmentationSummary {
        let best_pixel_acc =
            engine::epoch_fields_at::<SegmentationEpoch>(&run.metrics_path, t.best_epoch)
                .and_then(|m| m.val_pixel_acc)
                .unwrap_or(last.pixel_acc);
        SegmentationSummary {
            best_miou: t.best,
            best_pixel_acc,
            final_miou: last.miou,
            final_pixel_acc: last.pixel_acc,
        }
    }

    fn train_accuracy_name(&self) -> &'static str {
        "pixel acc"
    }
}
