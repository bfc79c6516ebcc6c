//! Object detection (paper §6.1, Table 8: the detection transfer study): torchvision's Faster
//! R-CNN with a feature pyramid (`fasterrcnn_resnet50_fpn`'s design) on any backbone of this
//! project's ResNet family, trained by the shared engine like the other tasks.
//!
//! * [`boxes`]: box arithmetic, IoU, NMS (per class too) and the box coder, as tensor operations
//!   that run wherever the tensors are.
//! * [`roi_align`]: RoIAlign (torchvision's `roi_align`).
//! * [`dataset`]: COCO JSON, Pascal VOC XML and YOLO txt annotations, one in-memory form.
//! * [`transforms`]: joint image/box augmentation (flip, crop) that keeps boxes right.
//! * [`loader`]: the deterministic batch loader (lists of images of any size, their targets).
//! * [`model`]: the detector: backbone + FPN, RPN, RoI heads, the input transform; parameter
//!   names as torchvision's, so its checkpoints load.
//! * [`coco_eval`]: COCO mAP@[.5:.95], AP50, AP75, AP by object size and per class, computed as
//!   `pycocotools` computes them.
//! * [`predict`]: a trained detector on single images (boxes drawn or as JSON) and on a dataset.
//! * [`task`]: the task the engine trains (losses per term in `metrics.jsonl`, mAP as the
//!   headline), the backbone's initialisation from a classification checkpoint.

pub mod boxes;
pub mod coco_eval;
pub mod dataset;
pub mod loader;
pub mod model;
pub mod predict;
pub mod roi_align;
pub mod task;
pub mod transforms;

pub use task::{
    load_backbone, model_options, open_train_val, read_metrics, train, DetEpochMetrics, DetEval,
    DetSummary, Detection, DetectionEpoch, DetectionSummary,
};

use crate::config::{Config, Task};
use anyhow::{bail, Result};

/// Checks the `[detect]` keys (and the keys detection cannot use) of a config whose
/// `task = "detection"`; every error names its key. Called by [`crate::recipe::check`].
pub fn validate_config(cfg: &Config) -> Result<()> {
    debug_assert_eq!(cfg.task, Task::Detection);
    let d = &cfg.detect;
    for (key, v) in [("train_split", &d.train_split), ("val_split", &d.val_split)] {
        if v.is_empty() || v.contains(['/', '\\']) {
            bail!("key `detect.{key}` must be a split name such as \"train2017\", got {v:?}");
        }
    }
    if d.min_size.is_empty() || d.min_size.iter().any(|&s| s < 1) {
        bail!(
            "key `detect.min_size` must list positive sizes, got {:?}",
            d.min_size
        );
    }
    if d.max_size < 1 {
        bail!("key `detect.max_size` must be positive, got {}", d.max_size);
    }
    if d.anchor_sizes.len() != 5 || d.anchor_sizes.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        bail!(
            "key `detect.anchor_sizes` must give 5 positive sizes (P2…P6), got {:?}",
            d.anchor_sizes
        );
    }
    if d.aspect_ratios.is_empty() || d.aspect_ratios.iter().any(|&r| !(r > 0.0 && r.is_finite())) {
        bail!(
            "key `detect.aspect_ratios` must list positive ratios, got {:?}",
            d.aspect_ratios
        );
    }
    for (key, v) in [
        ("rpn_pre_nms_top_n_train", d.rpn_pre_nms_top_n_train),
        ("rpn_pre_nms_top_n_test", d.rpn_pre_nms_top_n_test),
        ("rpn_post_nms_top_n_train", d.rpn_post_nms_top_n_train),
        ("rpn_post_nms_top_n_test", d.rpn_post_nms_top_n_test),
        ("rpn_batch_size_per_image", d.rpn_batch_size_per_image),
        ("box_batch_size_per_image", d.box_batch_size_per_image),
        ("box_detections_per_img", d.box_detections_per_img),
    ] {
        if v < 1 {
            bail!("key `detect.{key}` must be positive, got {v}");
        }
    }
    for (key, v) in [
        ("rpn_nms_thresh", d.rpn_nms_thresh),
        ("rpn_fg_iou_thresh", d.rpn_fg_iou_thresh),
        ("rpn_bg_iou_thresh", d.rpn_bg_iou_thresh),
        ("rpn_positive_fraction", d.rpn_positive_fraction),
        ("rpn_score_thresh", d.rpn_score_thresh),
        ("box_score_thresh", d.box_score_thresh),
        ("box_nms_thresh", d.box_nms_thresh),
        ("box_fg_iou_thresh", d.box_fg_iou_thresh),
        ("box_bg_iou_thresh", d.box_bg_iou_thresh),
        ("box_positive_fraction", d.box_positive_fraction),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("key `detect.{key}` must be in [0, 1], got {v}");
        }
    }
    if d.rpn_bg_iou_thresh > d.rpn_fg_iou_thresh {
        bail!(
            "key `detect.rpn_bg_iou_thresh` ({}) must not exceed `detect.rpn_fg_iou_thresh` ({})",
            d.rpn_bg_iou_thresh,
            d.rpn_fg_iou_thresh
        );
    }
    if d.box_bg_iou_thresh > d.box_fg_iou_thresh {
        bail!(
            "key `detect.box_bg_iou_thresh` ({}) must not exceed `detect.box_fg_iou_thresh` ({})",
            d.box_bg_iou_thresh,
            d.box_fg_iou_thresh
        );
    }
    if !(d.crop_min_scale > 0.0 && d.crop_min_scale <= 1.0) {
        bail!(
            "key `detect.crop_min_scale` must be in (0, 1], got {}",
            d.crop_min_scale
        );
    }
    if d.trainable_layers > 5 {
        bail!(
            "key `detect.trainable_layers` must be 0…5 (stages trained from the top), got {}",
            d.trainable_layers
        );
    }
    if !(d.backbone_lr_mult >= 0.0 && d.backbone_lr_mult.is_finite()) {
        bail!(
            "key `detect.backbone_lr_mult` must be >= 0, got {}",
            d.backbone_lr_mult
        );
    }
    if d.eval_batch_size == 0 {
        bail!("key `detect.eval_batch_size` must be positive");
    }
    if !matches!(
        cfg.data.format,
        crate::config::DataFormat::Auto
            | crate::config::DataFormat::Coco
            | crate::config::DataFormat::Voc
            | crate::config::DataFormat::Yolo
    ) {
        bail!(
            "key `data.format` must be \"coco\", \"voc\", \"yolo\" or \"auto\" for task = \"detection\", got {:?}",
            format!("{:?}", cfg.data.format).to_lowercase()
        );
    }
    // Classification-only tricks: refuse rather than silently ignore.
    if !cfg.data.auto_augment.is_empty() {
        bail!("key `data.auto_augment`: RandAugment / TrivialAugment are not supported for task = \"detection\"; leave it \"\"");
    }
    if cfg.data.repeats > 1 {
        bail!("key `data.repeats`: repeated augmentation is not supported for task = \"detection\"; leave it 1");
    }
    if cfg.loss.name != crate::config::LossName::Ce {
        bail!("key `loss.name`: only \"ce\" is supported for task = \"detection\"");
    }
    if cfg.model.drop_path > 0.0 || cfg.model.drop_rate > 0.0 {
        bail!("keys `model.drop_path` / `model.drop_rate` are not supported for task = \"detection\"; set them to 0");
    }
    if cfg.cutmix.alpha > 0.0 {
        bail!("key `cutmix.alpha`: CutMix is not supported for task = \"detection\"; set it to 0");
    }
    if cfg.mixup.alpha > 0.0 {
        bail!("key `mixup.alpha`: mixup is not supported for task = \"detection\"; set it to 0");
    }
    if cfg.loss.label_smoothing > 0.0 {
        bail!("key `loss.label_smoothing` is not supported for task = \"detection\"; set it to 0");
    }
    if !cfg.distill.teacher.is_empty() {
        bail!("key `distill.teacher`: distillation is not supported for task = \"detection\"");
    }
    if !cfg.finetune.from.is_empty() {
        bail!("key `finetune.from` is for classification; a detection backbone is set with `detect.backbone` (or `tricks finetune --from`)");
    }
    if cfg.finetune.mode == crate::config::FinetuneMode::LinearProbe {
        bail!("key `finetune.mode`: a linear probe is for classification; detection freezes backbone stages with `detect.trainable_layers`");
    }
    if cfg.model.num_classes != 0 {
        bail!("key `model.num_classes` is unused for task = \"detection\" (the classes are the dataset's); leave it 0");
    }
    if cfg.model.name.starts_with("cifar_")
        || cfg.model.name == "airbench94"
        || cfg.model.cifar_stem
    {
        bail!(
            "key `model.name`: detection needs an ImageNet-layout ResNet (resnet18…resnet152, without model.cifar_stem), got {:?}",
            cfg.model.name
        );
    }
    Ok(())
}

/// `tricks train --check` for detection: the config, the backbone checkpoint and the dataset
/// (both splits' annotations read and checked), without training. Returns lines for a person.
pub fn check(cfg: &Config) -> Result<Vec<String>> {
    let spec = crate::model::ModelSpec::from_config(&cfg.model)?;
    let mut lines = vec![format!(
        "config: ok (detection, Faster R-CNN + FPN on {} variant {}, shorter side {:?} up to {}, peak lr {})",
        spec.name,
        cfg.model.variant,
        cfg.detect.min_size,
        cfg.detect.max_size,
        crate::train::schedule::peak_lr(&cfg.optim, cfg.train.batch_size, 1)
    )];
    if !cfg.detect.backbone.is_empty() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = model::FasterRcnn::new(&vs.root(), &spec, 2, model_options(cfg))?;
        load_backbone(&vs, cfg)?;
        lines.push(format!("backbone: ok ({})", cfg.detect.backbone));
    }
    if cfg.data.dir.is_empty() {
        lines.push("data: not given (pass --data DIR or set data.dir)".into());
    } else {
        let (tr, va) = open_train_val(cfg)?;
        let objects =
            |d: &dataset::DetDataset| d.samples.iter().map(|s| s.objects.len()).sum::<usize>();
        lines.push(format!(
            "data: ok ({} training images with {} objects, {} evaluation images with {} objects, {} classes, {} steps per epoch)",
            tr.len(),
            objects(&tr),
            va.len(),
            objects(&va),
            tr.classes.len(),
            tr.len() / cfg.train.batch_size,
        ));
    }
    Ok(lines)
}
