//! Semantic segmentation (paper §6, the transfer study): an FCN head (Long et al. 2015, as in
//! GluonCV) on a dilated ResNet backbone from this project's family, trained with the same
//! optimizer, schedule, precision and checkpoints as classification.
//!
//! * [`dataset`]: `root/{train,val}/images/*.{jpg,png}` with `root/{train,val}/masks/<stem>.png`
//!   (8-bit class ids, `segment.ignore_index` = void).
//! * [`transforms`]: joint image/mask transforms that keep both aligned (random scale with the
//!   image bilinear and the mask nearest, random crop with padding, flip).
//! * [`loader`]: the deterministic parallel batch loader (`[B,3,H,W]` f32, `[B,H,W]` i64).
//! * [`model`]: [`SegModel`] = [`crate::model::ResNet::backbone`] (output stride 8) + [`FcnHead`];
//!   backbone tensors keep their classification names, the head lives under `head.`, so a
//!   classification checkpoint initialises the backbone by name.
//! * [`metrics`]: pixel accuracy and mean IoU from a confusion matrix.
//! * [`train`](mod@train): the training loop (`metrics.jsonl`, checkpoints, resume, `summary.json`).
//! * [`predict`]: evaluation of a checkpoint and colourised predictions.
//!
//! Percentages: pixel accuracy and mIoU are reported in % (0–100), like top-1 in classification.

pub mod dataset;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod task;
pub mod transforms;

pub use dataset::{Mask, SegDataset};
pub use loader::{SegBatch, SegLoader};
pub use metrics::ConfusionMatrix;
pub use model::{load_backbone, FcnHead, SegModel};
pub use predict::{evaluate_checkpoint, load_model, palette, predict_image, Prediction};
pub use task::{
    evaluate, read_metrics, train, SegEpochMetrics, SegEval, SegSummary, Segmentation,
    SegmentationEpoch, SegmentationSummary,
};

use crate::config::{Config, Task};
use anyhow::{bail, Result};

/// Checks the `[segment]` keys (and the keys segmentation cannot use) of a config whose
/// `task = "segmentation"`; every error names its key. Called by [`crate::recipe::check`].
pub fn validate_config(cfg: &Config) -> Result<()> {
    debug_assert_eq!(cfg.task, Task::Segmentation);
    let s = &cfg.segment;
    if !(1..=255).contains(&s.num_classes) {
        bail!(
            "key `segment.num_classes` must be in [1, 255] for task = \"segmentation\", got {}",
            s.num_classes
        );
    }
    if !(0..=255).contains(&s.ignore_index) {
        bail!(
            "key `segment.ignore_index` must be an 8-bit mask value in [0, 255], got {}",
            s.ignore_index
        );
    }
    if s.ignore_index < s.num_classes {
        bail!(
            "key `segment.ignore_index` ({}) is a class id (segment.num_classes = {}); void must be a value >= num_classes",
            s.ignore_index,
            s.num_classes
        );
    }
    if s.crop_size == 0 {
        bail!("key `segment.crop_size` must be positive");
    }
    let [a, b] = s.scale;
    if !(a > 0.0 && a <= b && b.is_finite()) {
        bail!("key `segment.scale` must satisfy 0 < min <= max, got [{a}, {b}]");
    }
    if ![8, 16, 32].contains(&s.output_stride) {
        bail!(
            "key `segment.output_stride` must be 8, 16 or 32, got {}",
            s.output_stride
        );
    }
    if !(0.0..1.0).contains(&s.dropout) {
        bail!("key `segment.dropout` must be in [0, 1), got {}", s.dropout);
    }
    if !(s.backbone_lr_mult >= 0.0 && s.backbone_lr_mult.is_finite()) {
        bail!(
            "key `segment.backbone_lr_mult` must be >= 0, got {}",
            s.backbone_lr_mult
        );
    }
    if !s.class_names.is_empty() && s.class_names.len() as i64 != s.num_classes {
        bail!(
            "key `segment.class_names` lists {} names but `segment.num_classes` is {}",
            s.class_names.len(),
            s.num_classes
        );
    }
    // Classification-only tricks: refuse rather than silently ignore.
    if !cfg.data.auto_augment.is_empty() {
        bail!("key `data.auto_augment`: RandAugment / TrivialAugment are not supported for task = \"segmentation\"; leave it \"\"");
    }
    if cfg.data.repeats > 1 {
        bail!("key `data.repeats`: repeated augmentation is not supported for task = \"segmentation\"; leave it 1");
    }
    if cfg.loss.name != crate::config::LossName::Ce {
        bail!("key `loss.name`: only \"ce\" is supported for task = \"segmentation\"");
    }
    if cfg.model.drop_path > 0.0 || cfg.model.drop_rate > 0.0 {
        bail!("keys `model.drop_path` / `model.drop_rate` are not supported for task = \"segmentation\"; set them to 0");
    }
    if cfg.cutmix.alpha > 0.0 {
        bail!(
            "key `cutmix.alpha`: CutMix is not supported for task = \"segmentation\"; set it to 0"
        );
    }
    if cfg.mixup.alpha > 0.0 {
        bail!("key `mixup.alpha`: mixup is not supported for task = \"segmentation\"; set it to 0");
    }
    if cfg.loss.label_smoothing > 0.0 {
        bail!(
            "key `loss.label_smoothing` is not supported for task = \"segmentation\"; set it to 0"
        );
    }
    if !cfg.distill.teacher.is_empty() {
        bail!("key `distill.teacher`: distillation is not supported for task = \"segmentation\"");
    }
    if !cfg.finetune.from.is_empty() {
        bail!("key `finetune.from` is for classification; a segmentation backbone is set with `segment.backbone`");
    }
    if cfg.model.num_classes != 0 {
        bail!("key `model.num_classes` is unused for task = \"segmentation\" (set `segment.num_classes`); leave it 0");
    }
    Ok(())
}

/// The class names of a segmentation config: `segment.class_names`, else `class0`, `class1`, ...
pub fn class_names(cfg: &Config) -> Vec<String> {
    if cfg.segment.class_names.is_empty() {
        (0..cfg.segment.num_classes)
            .map(|i| format!("class{i}"))
            .collect()
    } else {
        cfg.segment.class_names.clone()
    }
}

/// `tricks train --check` for segmentation: the config, the backbone checkpoint and the data
/// folder, without training. Returns lines for a person.
pub fn check(cfg: &Config) -> Result<Vec<String>> {
    let spec = crate::model::ModelSpec::from_config(&cfg.model)?;
    let mut lines = vec![format!(
        "config: ok (segmentation, FCN on {} variant {} at output stride {}, {} classes, peak lr {})",
        spec.name,
        cfg.model.variant,
        cfg.segment.output_stride,
        cfg.segment.num_classes,
        crate::train::schedule::peak_lr(&cfg.optim, cfg.train.batch_size, 1)
    )];
    if !cfg.segment.backbone.is_empty() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = SegModel::new(&vs.root(), cfg)?;
        load_backbone(&vs, cfg)?;
        lines.push(format!("backbone: ok ({})", cfg.segment.backbone));
    }
    if cfg.data.dir.is_empty() {
        lines.push("data: not given (pass --data DIR or set data.dir)".into());
    } else {
        let (tr, va) = dataset::open_train_val(cfg)?;
        let skipped = tr.skipped().len() + va.skipped().len();
        lines.push(format!(
            "data: ok ({} training and {} evaluation image/mask pairs, {} steps per epoch{})",
            tr.len(),
            va.len(),
            tr.len() / cfg.train.batch_size,
            if skipped > 0 {
                format!("; {skipped} entries skipped, named in the warnings above")
            } else {
                String::new()
            }
        ));
    }
    Ok(lines)
}
