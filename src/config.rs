//! The run configuration: one strict TOML document, every field documented, every trick a key.
//!
//! Unknown keys and wrong types are errors that name the key (`optim.lrr`); `--set a.b=v`
//! overrides any key before validation, so a mistake is caught before compute is spent.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything a training run needs. Defaults are the paper's baseline (Table 2 recipe):
/// every trick is off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed of every random choice: weight init, data order, augmentation, mixup.
    pub seed: u64,
    /// What to train: "classification" (default), "segmentation" (paper §6, see `[segment]`) or
    /// "detection" (paper §6.1, see `[detect]`).
    #[serde(skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub loss: LossConfig,
    pub mixup: MixupConfig,
    pub cutmix: CutmixConfig,
    pub ema: EmaConfig,
    pub distill: DistillConfig,
    pub finetune: FinetuneConfig,
    /// Semantic segmentation (`task = "segmentation"`); ignored otherwise.
    #[serde(skip_serializing_if = "SegmentConfig::is_default")]
    pub segment: SegmentConfig,
    /// Object detection (`task = "detection"`); ignored otherwise.
    #[serde(skip_serializing_if = "DetectConfig::is_default")]
    pub detect: DetectConfig,
    /// Data-parallel training (used when the run is started by `tricks launch` or with
    /// RANK/WORLD_SIZE in the environment).
    #[serde(skip_serializing_if = "DistributedConfig::is_default")]
    pub distributed: DistributedConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            task: Task::Classification,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            loss: LossConfig::default(),
            mixup: MixupConfig::default(),
            cutmix: CutmixConfig::default(),
            ema: EmaConfig::default(),
            distill: DistillConfig::default(),
            finetune: FinetuneConfig::default(),
            segment: SegmentConfig::default(),
            detect: DetectConfig::default(),
            distributed: DistributedConfig::default(),
        }
    }
}

/// c10d backend of a data-parallel run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL on CUDA devices, Gloo on the CPU.
    #[default]
    Auto,
    Gloo,
    Nccl,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    pub backend: DistBackend,
    /// Batch-norm statistics over the global batch (all ranks) instead of each rank's own.
    pub sync_bn: bool,
    /// Seconds a rank waits for the others (rendezvous, any collective) before it stops with an
    /// error: a rank that died or hangs stops the run instead of blocking it forever.
    pub timeout_s: f64,
    /// Gradient all-reduce bucket size in MiB (DDP's `bucket_cap_mb`).
    pub bucket_mb: f64,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            backend: DistBackend::Auto,
            sync_bn: false,
            timeout_s: 300.0,
            bucket_mb: 25.0,
        }
    }
}

impl DistributedConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Image classification: a ResNet with its classifier (`[model]`, `[data]`).
    #[default]
    Classification,
    /// Semantic segmentation: an FCN head on a dilated ResNet backbone (`[segment]`).
    Segmentation,
    /// Object detection: Faster R-CNN with a feature pyramid on a ResNet backbone (`[detect]`).
    Detection,
}

impl Task {
    pub fn is_classification(&self) -> bool {
        *self == Task::Classification
    }
}

/// Semantic segmentation (paper §6 transfer study; FCN as in GluonCV). The dataset is
/// `data.dir/{train,val}/images/*.{jpg,png}` with `masks/<stem>.png` (8-bit class ids);
/// `data.mean` / `data.std` normalise, `data.flip` flips, `data.workers` / `data.cache` /
/// `data.train_limit` / `data.val_limit` apply; the backbone is `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Number of classes (mask values 0..num_classes-1).
    pub num_classes: i64,
    /// Mask value ignored by the loss and the metrics (void; 11 for CamVid). Must not be a class.
    pub ignore_index: i64,
    /// Side of the square training crop (after random scaling; padded when the image is smaller).
    pub crop_size: u32,
    /// Random scale range of training images (image bilinear, mask nearest).
    pub scale: [f64; 2],
    /// Backbone output stride: 8 (dilated layer3 + layer4, FCN's), 16 or 32.
    pub output_stride: i64,
    /// Dropout before the head's classifier conv.
    pub dropout: f64,
    /// Classification checkpoint whose weights initialise the backbone (all but `fc.`); "" = random.
    pub backbone: String,
    /// Learning-rate multiplier of the backbone (the head keeps the full lr).
    pub backbone_lr_mult: f64,
    /// Optional class names (num_classes of them), for reports and checkpoints.
    pub class_names: Vec<String>,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            num_classes: 0,
            ignore_index: 255,
            crop_size: 480,
            scale: [0.5, 2.0],
            output_stride: 8,
            dropout: 0.1,
            backbone: String::new(),
            backbone_lr_mult: 1.0,
            class_names: Vec::new(),
        }
    }
}

impl SegmentConfig {
    pub fn is_default(&self) -> bool {
        *self == SegmentConfig::default()
    }
}

/// Object detection (paper §6.1, Table 8): Faster R-CNN with a feature pyramid, torchvision's
/// `fasterrcnn_resnet50_fpn` design, on the backbone of `[model]`. The dataset is `data.dir` in
/// the layout of `data.format` ("coco", "voc" or "yolo"; "auto" tells them apart by their files);
/// `data.flip` flips, `data.mean` / `data.std` normalise, `data.workers` apply. Every default is
/// torchvision's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// The split names: `instances_<split>.json` (COCO), `ImageSets/Main/<split>.txt` (VOC),
    /// `images/<split>/` (YOLO).
    pub train_split: String,
    pub val_split: String,
    /// Shorter side of the input after resizing; training draws one of these per image
    /// (multi-scale training), evaluation uses the last (torchvision's `min_size[-1]`).
    pub min_size: Vec<i64>,
    /// Longer side at most this (the shorter side is reduced to keep it).
    pub max_size: i64,
    /// Random crop (a region of [crop_min_scale, 1] of each side; boxes whose centre falls in it
    /// are kept, clipped).
    pub crop: bool,
    pub crop_min_scale: f64,
    /// Anchor side per pyramid level (P2…P6) and the aspect ratios of every level.
    pub anchor_sizes: Vec<f64>,
    pub aspect_ratios: Vec<f64>,
    /// Region proposal network: candidates per level before NMS and proposals kept after it, in
    /// training and in evaluation.
    pub rpn_pre_nms_top_n_train: i64,
    pub rpn_pre_nms_top_n_test: i64,
    pub rpn_post_nms_top_n_train: i64,
    pub rpn_post_nms_top_n_test: i64,
    pub rpn_nms_thresh: f64,
    /// IoU at or above which an anchor is positive, below which it is negative.
    pub rpn_fg_iou_thresh: f64,
    pub rpn_bg_iou_thresh: f64,
    /// Anchors sampled per image for the RPN loss, and their positive share.
    pub rpn_batch_size_per_image: i64,
    pub rpn_positive_fraction: f64,
    pub rpn_score_thresh: f64,
    /// Detections: score threshold, per-class NMS IoU, detections kept per image.
    pub box_score_thresh: f64,
    pub box_nms_thresh: f64,
    pub box_detections_per_img: i64,
    /// RoI heads: IoU of a positive / negative proposal, proposals sampled per image and their
    /// positive share.
    pub box_fg_iou_thresh: f64,
    pub box_bg_iou_thresh: f64,
    pub box_batch_size_per_image: i64,
    pub box_positive_fraction: f64,
    /// Backbone batch norm frozen (torchvision's FrozenBatchNorm2d: statistics and affine fixed).
    pub frozen_bn: bool,
    /// Backbone stages that train, from the top: 0 (none) … 5 (all, stem included).
    pub trainable_layers: usize,
    /// Checkpoint whose weights initialise the backbone: a classification checkpoint of this
    /// project, or a timm / torchvision ResNet (safetensors); "" = random.
    pub backbone: String,
    /// Learning-rate multiplier of the backbone (FPN, RPN and RoI heads keep the full lr).
    pub backbone_lr_mult: f64,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            train_split: "train".into(),
            val_split: "val".into(),
            min_size: vec![800],
            max_size: 1333,
            crop: false,
            crop_min_scale: 0.3,
            anchor_sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            rpn_pre_nms_top_n_train: 2000,
            rpn_pre_nms_top_n_test: 1000,
            rpn_post_nms_top_n_train: 2000,
            rpn_post_nms_top_n_test: 1000,
            rpn_nms_thresh: 0.7,
            rpn_fg_iou_thresh: 0.7,
            rpn_bg_iou_thresh: 0.3,
            rpn_batch_size_per_image: 256,
            rpn_positive_fraction: 0.5,
            rpn_score_thresh: 0.0,
            box_score_thresh: 0.05,
            box_nms_thresh: 0.5,
            box_detections_per_img: 100,
            box_fg_iou_thresh: 0.5,
            box_bg_iou_thresh: 0.5,
            box_batch_size_per_image: 512,
            box_positive_fraction: 0.25,
            frozen_bn: true,
            trainable_layers: 3,
            backbone: String::new(),
            backbone_lr_mult: 1.0,
            eval_batch_size: 2,
        }
    }
}

impl DetectConfig {
    pub fn is_default(&self) -> bool {
        *self == DetectConfig::default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet152" (also "resnet26": timm's
    /// (2, 2, 2, 2) bottleneck ResNet) |
    /// timm's ResNeXt and squeeze-and-excitation names: "resnext50_32x4d", "resnext101_32x4d"
    /// (`resnext<depth>_<cardinality>x<base width>d`, bottleneck depths), "seresnet18" ..
    /// "seresnet152", "seresnext26_32x4d", "seresnext50_32x4d", "seresnext101_32x4d" (`variant`
    /// applies to them as to the ResNets: timm's `seresnext26d_32x4d` is "seresnext26_32x4d" "d") |
    /// "cifar_resnet20" | "cifar_resnet32" | "cifar_resnet44" | "cifar_resnet56" | "cifar_resnet110" |
    /// "airbench94" (the network of Jordan's airbench94 CIFAR-10 speed record, for time-to-accuracy
    /// runs; `variant`, `zero_gamma` and `cifar_stem` do not apply to it).
    pub name: String,
    /// Paper Figure 2: "a" original, "b" stride on the 3x3 conv, "c" b + deep stem, "d" c + avg-pool shortcut.
    pub variant: String,
    /// Number of classes; 0 = taken from the dataset.
    pub num_classes: i64,
    /// Zero γ (paper §3.1): the last BN of every residual block starts with γ = 0.
    pub zero_gamma: bool,
    /// ImageNet ResNets (resnet18..152) on 32-px images: the stem keeps full resolution (3x3
    /// stride-1 conv, or ResNet-C's three at stride 1, and no max-pool), as the CIFAR ResNet-18
    /// of kuangliu/pytorch-cifar, so the four stages see 32, 16, 8 and 4 px instead of 8 to 1.
    /// Widths and names are unchanged; only `conv1` differs in shape from ImageNet weights.
    pub cifar_stem: bool,
    /// airbench94: the whitening conv's bias trains for this many epochs, then stays fixed
    /// (0 = it trains throughout).
    pub whiten_bias_epochs: usize,
    /// Stochastic depth (timm's `drop_path_rate`): in training, each residual block's branch is
    /// dropped per sample with a probability rising linearly from 0 at the first block to this
    /// at the last (the survivors scaled by 1/keep). ResNet family, classification only.
    pub drop_path: f64,
    /// Dropout on the pooled features before the classifier (timm's `drop_rate`).
    pub drop_rate: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "cifar_resnet20".into(),
            variant: "a".into(),
            num_classes: 0,
            zero_gamma: false,
            cifar_stem: false,
            whiten_bias_epochs: 0,
            drop_path: 0.0,
            drop_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// ImageFolder if `train/` holds class folders, CIFAR binary if it holds `*.bin` files.
    Auto,
    ImageFolder,
    Cifar10,
    Cifar100,
    /// Detection: COCO JSON, `annotations/instances_<split>.json` with the images in
    /// `images/<split>/` or `<split>/`.
    Coco,
    /// Detection: Pascal VOC, `Annotations/*.xml`, `ImageSets/Main/<split>.txt`, `JPEGImages/`.
    Voc,
    /// Detection: YOLO txt (Ultralytics), `images/<split>/`, `labels/<split>/*.txt` and the class
    /// names in `data.yaml` or `classes.txt`.
    Yolo,
}

impl DataFormat {
    /// The annotation formats of detection.
    pub fn is_detection(self) -> bool {
        matches!(self, DataFormat::Coco | DataFormat::Voc | DataFormat::Yolo)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pipeline {
    /// Pad-and-crop + flip (He et al. 2016), for 32-px images.
    Cifar,
    /// The paper's ImageNet pipeline: random-resized crop, flip, colour jitter, PCA lighting.
    Imagenet,
}

/// What the CIFAR pipeline's padding holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PadMode {
    Zeros,
    /// The image mirrored at its edges, without repeating the edge (PyTorch's `reflect`).
    Reflect,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset root: holds `train/` and `val/` (or `test/`), or CIFAR binary files.
    pub dir: String,
    pub format: DataFormat,
    /// Training augmentation preset.
    pub pipeline: Pipeline,
    /// Side of the square training crop (224 for ImageNet, 32 for CIFAR).
    pub train_size: u32,
    /// Side of the square evaluation crop.
    pub val_size: u32,
    /// Evaluation resizes the shorter side to `val_size / val_crop_ratio`, then centre-crops.
    pub val_crop_ratio: f64,
    /// Random-resized crop: area fraction range and aspect-ratio range (paper §2: 8–100 %, 3/4–4/3).
    pub rrc_area: [f64; 2],
    pub rrc_aspect: [f64; 2],
    /// Random horizontal flip with probability 0.5.
    pub flip: bool,
    /// Alternating flip (airbench): with `flip`, each image is mirrored at random in the first
    /// epoch, then every epoch the other way from the one before, so that every two consecutive
    /// epochs show both views of every image.
    pub alternate_flip: bool,
    /// Brightness, contrast and saturation scaled by factors drawn from U[1 - jitter, 1 + jitter].
    pub jitter: f64,
    /// Hue rotated by an angle drawn from U[-hue, hue] × 180°.
    pub hue: f64,
    /// PCA lighting noise σ (AlexNet-style, ImageNet eigenvectors).
    pub lighting: f64,
    /// CIFAR pipeline: padding before the random crop.
    pub cifar_pad: u32,
    /// How the CIFAR pipeline pads: "zeros" (He et al. 2016) or "reflect" (mirrored edge pixels,
    /// as airbench translates).
    pub pad_mode: PadMode,
    /// Random erasing (Zhong et al. 2020, timm's `RandomErasing` in "pixel" mode): with this
    /// probability a training image gets a rectangle of `erase_area` of its area (a fraction,
    /// drawn uniformly) and aspect ratio in `erase_aspect` (log-uniform) filled with N(0, 1) noise
    /// after normalisation; 0 = off (timm's recipes: 0.25).
    pub erase_prob: f64,
    pub erase_area: [f64; 2],
    pub erase_aspect: [f64; 2],
    /// Automatic augmentation of each training image after its crop and flip, on the u8 image
    /// before normalisation (where torchvision's classification recipe puts it); "" = off.
    /// `"rand-m9-n2-mstd0.5"`: RandAugment (Cubuk et al. 2020) as torchvision's
    /// `RandAugment(num_ops = n, magnitude = m, num_magnitude_bins = 31)`: `n` operations drawn
    /// uniformly from 14 (identity, shear, translation, rotation, brightness, colour, contrast,
    /// sharpness, posterize, solarize, autocontrast, equalize) at magnitude bin `m` of 0–30, the
    /// signed ones negated with probability ½; `mstd` (timm's magnitude std) draws each
    /// operation's bin from N(m, mstd) clipped to [0, 30]. The parts follow `rand` in any order;
    /// omitted ones take torchvision's defaults m9, n2 and mstd0. Note that `m` counts
    /// torchvision's 31 bins, not timm's scale of 10 (timm's m9 is bin 27 here). `"ta_wide"`:
    /// TrivialAugmentWide (Müller & Hutter 2021, torchvision's), one operation at a uniformly
    /// drawn bin of its wider ranges. The colour jitter and lighting of the imagenet pipeline
    /// still apply after it (timm turns jitter off with auto-augmentation: set `jitter` and
    /// `lighting` to 0 to follow it). Not with `on_device`.
    pub auto_augment: String,
    /// Repeated augmentation (Hoffer et al. 2020; DeiT's and torchvision's `RASampler`): each
    /// epoch every image of the shuffled order appears this many times in a row, each copy
    /// augmented with its own draws; the repeated list is dealt across the data-parallel ranks
    /// (rank r takes positions r, r + world, ...), and each rank keeps
    /// ⌊⌊len/256⌋·256 / world⌋ samples, so that an epoch stays about one dataset long (and
    /// sees about 1/repeats of the images), cut into batches (drop_last). 1 = off (the plain
    /// shuffled epoch); torchvision's recipes use 3 (`--ra-reps`); it needs at least 256
    /// training images. As the copies of an image go to different ranks, a data-parallel run
    /// with it is not one process on the global batch (as it is without). Not with `on_device`.
    pub repeats: usize,
    /// Per-channel normalisation (RGB, on the 0–1 scale).
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Decoding/augmentation threads; 0 = all cores.
    pub workers: usize,
    /// Batches prepared ahead of the trainer.
    pub prefetch: usize,
    /// Decode every image once and keep it in memory as u8 (small datasets).
    pub cache: bool,
    /// Keep the whole dataset on the training device (u8) and augment batches there (CIFAR
    /// pipeline only): no loader threads, no host-to-device copies after the start.
    pub on_device: bool,
    /// Use only this many training / evaluation images (0 = all); a seeded, class-balanced subset.
    pub train_limit: usize,
    pub val_limit: usize,
    /// Skip unreadable images (counted in the summary) instead of stopping with an error.
    pub skip_bad_images: bool,
    /// Training on a GPU: the loader writes batches into page-locked host memory, so that their
    /// upload runs beside the GPU's work (PyTorch DataLoader's `pin_memory`). No effect on a CPU.
    pub pin_memory: bool,
}

impl DataConfig {
    /// This configuration as seen by a loader that feeds `device`: page-locked batches only when
    /// it is a GPU (pinning for a CPU would only cost).
    pub fn for_device(&self, device: tch::Device) -> DataConfig {
        DataConfig {
            pin_memory: self.pin_memory && device.is_cuda(),
            ..self.clone()
        }
    }
}

/// Magnitude bins of the automatic augmentation policies: torchvision's `num_magnitude_bins`
/// default, bins 0–30.
pub const AUTO_AUGMENT_BINS: u32 = 31;

/// `data.auto_augment` parsed: an automatic augmentation policy and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AutoAugmentPolicy {
    /// torchvision's `RandAugment`, with timm's magnitude noise.
    Rand {
        /// Operations applied one after the other (`n`).
        num_ops: usize,
        /// The magnitude bin of every operation, 0 to [`AUTO_AUGMENT_BINS`] − 1 (`m`).
        magnitude: u32,
        /// Standard deviation of each operation's bin around `magnitude` (`mstd`; 0 = fixed).
        magnitude_std: f64,
    },
    /// torchvision's `TrivialAugmentWide`.
    TrivialWide,
}

impl AutoAugmentPolicy {
    /// Parses a `data.auto_augment` value: `None` for "" (off); otherwise `"rand"` followed by
    /// `-m<bin>`, `-n<ops>`, `-mstd<std>` in any order (each at most once; torchvision's defaults
    /// m9, n2, mstd0 for the ones left out), or `"ta_wide"`. Errors name the key and what is
    /// accepted.
    pub fn parse(text: &str) -> Result<Option<AutoAugmentPolicy>> {
        const ACCEPTED: &str = "accepted: \"\" (off), \"rand\" with optional parts -m<magnitude bin 0-30>, -n<number of ops >= 1>, -mstd<magnitude std >= 0> in any order (RandAugment, e.g. \"rand-m9-n2-mstd0.5\"), or \"ta_wide\" (TrivialAugmentWide)";
        let fail = |why: String| -> Result<Option<AutoAugmentPolicy>> {
            bail!("key `data.auto_augment`: {why}; {ACCEPTED}")
        };
        match text {
            "" => return Ok(None),
            "ta_wide" => return Ok(Some(AutoAugmentPolicy::TrivialWide)),
            _ => {}
        }
        let mut parts = text.split('-');
        if parts.next() != Some("rand") {
            return fail(format!("unknown policy {text:?}"));
        }
        let (mut num_ops, mut magnitude, mut magnitude_std) = (None, None, None);
        for part in parts {
            // `mstd` before `m`: both start with "m".
            if let Some(v) = part.strip_prefix("mstd") {
                match v.parse::<f64>() {
                    Ok(std) if std >= 0.0 && std.is_finite() && magnitude_std.is_none() => {
                        magnitude_std = Some(std)
                    }
                    _ => return fail(format!("bad or repeated part {part:?} in {text:?}")),
                }
            } else if let Some(v) = part.strip_prefix('m') {
                match v.parse::<u32>() {
                    Ok(m) if m < AUTO_AUGMENT_BINS && magnitude.is_none() => magnitude = Some(m),
                    _ => return fail(format!("bad or repeated part {part:?} in {text:?}")),
                }
            } else if let Some(v) = part.strip_prefix('n') {
                match v.parse::<usize>() {
                    Ok(n) if n >= 1 && num_ops.is_none() => num_ops = Some(n),
                    _ => return fail(format!("bad or repeated part {part:?} in {text:?}")),
                }
            } else {
                return fail(format!("unknown part {part:?} in {text:?}"));
            }
        }
        Ok(Some(AutoAugmentPolicy::Rand {
            num_ops: num_ops.unwrap_or(2),
            magnitude: magnitude.unwrap_or(9),
            magnitude_std: magnitude_std.unwrap_or(0.0),
        }))
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: String::new(),
            format: DataFormat::Auto,
            pipeline: Pipeline::Imagenet,
            train_size: 224,
            val_size: 224,
            val_crop_ratio: 0.875,
            rrc_area: [0.08, 1.0],
            rrc_aspect: [3.0 / 4.0, 4.0 / 3.0],
            flip: true,
            alternate_flip: false,
            jitter: 0.4,
            hue: 0.4,
            erase_prob: 0.0,
            erase_area: [0.02, 1.0 / 3.0],
            erase_aspect: [0.3, 1.0 / 0.3],
            auto_augment: String::new(),
            repeats: 1,
            lighting: 0.1,
            cifar_pad: 4,
            pad_mode: PadMode::Zeros,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            workers: 0,
            prefetch: 4,
            cache: false,
            on_device: false,
            train_limit: 0,
            val_limit: 0,
            skip_bad_images: false,
            pin_memory: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 autocast (CUDA, or CPUs with AVX-512-BF16/AMX); master weights and BN in f32.
    Bf16,
    /// f16 autocast with dynamic loss scaling (CUDA).
    Fp16,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;

    /// The config file's spelling: `fp32`, `bf16` or `fp16`.
    fn from_str(s: &str) -> Result<Precision> {
        Ok(match s {
            "fp32" => Precision::Fp32,
            "bf16" => Precision::Bf16,
            "fp16" => Precision::Fp16,
            _ => bail!("unknown precision {s:?}; expected fp32, bf16 or fp16"),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Per-process batch size.
    pub batch_size: usize,
    /// Low-precision training (paper §3.1).
    pub precision: Precision,
    /// Keep activations in NHWC (faster convolutions with oneDNN and cuDNN).
    pub channels_last: bool,
    /// Evaluate every N epochs (the last epoch always).
    pub eval_every: usize,
    /// Test-time flip augmentation: evaluation scores the mean logits of each image and its
    /// mirror image (one more forward pass per evaluated image), as airbench does.
    pub eval_flip: bool,
    /// Test-time translation (airbench's `tta_level = 2`): evaluation scores ½ of the logits of
    /// each image plus ¼ of each of its two copies shifted by one pixel diagonally (up-left and
    /// down-right, reflect-padded); each view with its mirror too when `eval_flip`.
    pub eval_translate: bool,
    /// Keep the last K epoch checkpoints (plus `best`).
    pub keep_checkpoints: usize,
    /// Intra-op threads for libtorch; 0 = one per core this process may use, fewer while other
    /// processes keep some of those cores busy on a CPU run (`device::IntraOpThreads`).
    pub threads: usize,
    /// cuDNN's autotuner on a GPU (PyTorch's `torch.backends.cudnn.benchmark`): each new input
    /// shape first times the convolution algorithms and keeps the fastest. Faster steps for fixed
    /// shapes, at a one-off cost of a few seconds in the first epoch.
    pub cudnn_benchmark: bool,
    /// Stop after this many optimiser steps in total (0 = no limit); for smoke tests and benchmarks.
    pub max_steps: usize,
    /// Before the first epoch, one untimed training step (augmentation on the device, forward,
    /// loss, backward, optimiser step, lookahead average) and the evaluation's forward passes,
    /// then undone (weights, BN statistics, momentum and slow weights restored, gradients
    /// zeroed): cuDNN's autotuning and each kernel's first-use loading then fall outside the
    /// epochs' seconds, as airbench's untimed warm-up run keeps them out of its clock. The
    /// training is the same with or without it.
    pub untimed_warmup: bool,
    /// TensorBoard (`<run>/tb/`): also log the training loss (the mean over the epoch's steps
    /// since the last point; in a data-parallel run, rank 0's share of each batch) and the lr
    /// every N optimiser steps, at the global step, besides the per-epoch scalars (0 = per epoch
    /// only). On a GPU a point is written at the first read-back of the running loss at or after
    /// each multiple of N (every 25 steps), so logging adds no device sync. Changes no training:
    /// a resume may change it.
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 120,
            batch_size: 256,
            precision: Precision::Fp32,
            channels_last: false,
            eval_every: 1,
            eval_flip: false,
            eval_translate: false,
            keep_checkpoints: 2,
            threads: 0,
            cudnn_benchmark: true,
            max_steps: 0,
            untimed_warmup: false,
            log_every: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Multiply the lr by `step_gamma` at each epoch of `step_epochs`.
    Step,
    /// η_t = ½(1 + cos(tπ/T)) η, per iteration (paper §5.1).
    Cosine,
    /// Piecewise linear per iteration (airbench): from `triangle[0]`·η at the start up to η at
    /// the fraction `triangle[1]` of the run, then down to `triangle[2]`·η at its end.
    Triangle,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// The update rule: "sgd" (the paper's Nesterov SGD), "adamw" (`torch.optim.AdamW`) or
    /// "lamb" (timm's `Lamb`, "ResNet strikes back" A2/A3). `momentum` and `nesterov` are SGD's;
    /// `betas` and `eps` Adam's and LAMB's; `weight_decay` and `no_bias_decay` apply to all.
    pub name: OptimName,
    /// AdamW / LAMB: (β1, β2).
    pub betas: [f64; 2],
    /// AdamW / LAMB: ε of the denominator (absent: 1e-8 for AdamW, 1e-6 for LAMB, the references'
    /// defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Learning rate (for a batch of `lr_reference_batch` when `linear_scaling` is on).
    pub lr: f64,
    /// Linear scaling (paper §3.1): lr = optim.lr × batch_size / lr_reference_batch.
    pub linear_scaling: bool,
    pub lr_reference_batch: usize,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// No bias decay (paper §3.1): weight decay only on conv and linear weights.
    pub no_bias_decay: bool,
    pub schedule: Schedule,
    /// Step schedule: epochs at which the lr is multiplied by `step_gamma`.
    pub step_epochs: Vec<usize>,
    pub step_gamma: f64,
    /// Triangle schedule: [start factor, position of the peak as a fraction of the run, end factor].
    pub triangle: [f64; 3],
    /// LR warmup (paper §3.1): linear from `warmup_start_lr` to the lr over this many epochs,
    /// updated every iteration.
    pub warmup_epochs: f64,
    pub warmup_start_lr: f64,
    /// Gradient clipping by global L2 norm (0 = off).
    pub clip_grad_norm: f64,
    /// Gradient clipping by value, elementwise to [-v, v] (0 = off).
    pub clip_grad_value: f64,
    /// Multiplier of the lr of batch-norm biases (airbench's `bias_scaler`: 64), with their
    /// weight decay divided by it, so that the decay per step (lr × wd) stays the others'.
    /// 1 = off.
    pub bn_bias_lr_scale: f64,
    /// Lookahead (Zhang et al. 2019, in airbench's form): every `lookahead_every` steps the
    /// weights and BN statistics move to an exponential average of themselves, w ← ŵ ←
    /// d·ŵ + (1 − d)·w, with d = `lookahead_decay`^every × (t/T)³ (t the step, T the run's steps):
    /// no averaging early on, strong averaging at the end. The run ends on the average.
    pub lookahead: bool,
    pub lookahead_every: usize,
    pub lookahead_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            name: OptimName::Sgd,
            betas: [0.9, 0.999],
            eps: None,
            lr: 0.1,
            linear_scaling: false,
            lr_reference_batch: 256,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            no_bias_decay: false,
            schedule: Schedule::Step,
            step_epochs: vec![30, 60, 90],
            step_gamma: 0.1,
            triangle: [0.2, 0.23, 0.07],
            warmup_epochs: 0.0,
            warmup_start_lr: 0.0,
            clip_grad_norm: 0.0,
            clip_grad_value: 0.0,
            bn_bias_lr_scale: 1.0,
            lookahead: false,
            lookahead_every: 5,
            lookahead_decay: 0.95,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Label smoothing ε (paper §5.2, the paper's form: 1-ε on the true class, ε/(K-1) elsewhere).
    pub label_smoothing: f64,
    /// The training loss: cross entropy ("ce"), or binary cross entropy over the classes ("bce",
    /// timm's `BinaryCrossEntropy`; the evaluation's loss stays cross entropy, as timm's).
    pub name: LossName,
    /// BCE only: targets above this become 1, the others 0 (timm's `bce_target_thresh`; absent:
    /// the soft targets as they are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bce_target_threshold: Option<f64>,
}

/// [`OptimConfig::name`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimName {
    #[default]
    Sgd,
    AdamW,
    Lamb,
}

/// [`LossConfig::name`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossName {
    #[default]
    Ce,
    Bce,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MixupConfig {
    /// Mixup α (paper §5.4: 0.2); 0 = off.
    pub alpha: f64,
    /// Train the last N epochs without mixup (and without CutMix).
    pub off_epochs: usize,
    /// Probability that a batch is mixed at all, by mixup or CutMix (timm's `mixup_prob`).
    pub prob: f64,
    /// With both mixup and CutMix on: probability that a batch uses CutMix (timm's
    /// `mixup_switch_prob`).
    pub switch_prob: f64,
}

impl Default for MixupConfig {
    fn default() -> Self {
        MixupConfig {
            alpha: 0.0,
            off_epochs: 0,
            prob: 1.0,
            switch_prob: 0.5,
        }
    }
}

/// Model EMA (timm's `ModelEmaV3`): an exponential moving average of the weights (parameters and
/// batch-norm statistics), evaluated beside the live weights each epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    /// The average's decay per update (timm's recipes: 0.9998 per step); 0 = off.
    pub decay: f64,
    /// Optimiser steps between updates (torchvision's `model_ema_steps`).
    pub every: usize,
    /// Warm the decay up: `min(decay, 1 − (1 + u/γ)^(−p))` at update u (timm's `use_warmup`).
    pub warmup: bool,
    /// γ of the warm-up (timm's `warmup_gamma`).
    pub warmup_gamma: f64,
    /// p of the warm-up (timm's `warmup_power`).
    pub warmup_power: f64,
    /// The average is the run's result: it picks and fills `best.safetensors` and gives the
    /// summary's figures (as timm's train.py does); false: the live weights do, and the average is
    /// only reported.
    pub use_for_best: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.0,
            every: 1,
            warmup: true,
            warmup_gamma: 1.0,
            warmup_power: 2.0 / 3.0,
            use_for_best: true,
        }
    }
}

impl EmaConfig {
    pub fn is_on(&self) -> bool {
        self.decay > 0.0
    }
}

/// CutMix (Yun et al. 2019; timm's `Mixup` with `cutmix_alpha`): paste a box of another image of
/// the batch, the targets weighted by the box's area. `mixup.prob`, `mixup.switch_prob` and
/// `mixup.off_epochs` also govern it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CutmixConfig {
    /// CutMix α: λ ~ Beta(α, α) before the box correction (timm's recipes: 1.0); 0 = off.
    pub alpha: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Knowledge distillation (paper §5.3): checkpoint of the teacher ("" = off).
    pub teacher: String,
    /// Temperature T.
    pub temperature: f64,
    /// Weight of the hard-label term ℓ(p, softmax(z)).
    pub hard_weight: f64,
    /// Weight of the distillation term T²·ℓ(softmax(r/T), softmax(z/T)).
    pub soft_weight: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            teacher: String::new(),
            temperature: 20.0,
            hard_weight: 1.0,
            soft_weight: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// Train every layer; the backbone's lr is scaled by `backbone_lr_mult`.
    Full,
    /// Train only the new classifier; the backbone is frozen with its BN in eval mode.
    LinearProbe,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Start from this checkpoint's weights (this project's, or converted timm/torchvision
    /// safetensors); the classifier `fc` is replaced for the new classes. "" = off.
    pub from: String,
    pub mode: FinetuneMode,
    /// Learning-rate multiplier of every layer but the classifier (full fine-tuning).
    pub backbone_lr_mult: f64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            from: String::new(),
            mode: FinetuneMode::Full,
            backbone_lr_mult: 1.0,
        }
    }
}

impl Config {
    /// Reads a TOML file, applies `key=value` overrides, and validates the result with
    /// [`Config::validate`] (syntax and ranges; `crate::recipe::load` adds the checks that need
    /// the model family or the task). A file may start from another with
    /// `extends = "other.toml"` (a path relative to it): its keys are merged over the other
    /// file's, table by table.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        Self::load_with(path, overrides, Config::validate)
    }

    /// [`Config::load`] with another validation than [`Config::validate`]; its errors are
    /// reported like the config's own (`invalid config <path>: ...`).
    pub fn load_with(
        path: &Path,
        overrides: &[String],
        validate: impl Fn(&Config) -> Result<()>,
    ) -> Result<Config> {
        let doc = load_table(path, 0)?;
        Self::from_table_with(doc, overrides, validate)
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses TOML text, applies `key=value` overrides and validates (syntax and ranges).
    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Config> {
        Self::from_toml_str_with(text, overrides, Config::validate)
    }

    /// [`Config::from_toml_str`] with another validation than [`Config::validate`].
    pub fn from_toml_str_with(
        text: &str,
        overrides: &[String],
        validate: impl Fn(&Config) -> Result<()>,
    ) -> Result<Config> {
        let doc: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        Self::from_table_with(doc, overrides, validate)
    }

    /// Applies `key=value` overrides to a parsed document, then deserializes and validates it
    /// (syntax and ranges).
    pub fn from_table(doc: toml::Table, overrides: &[String]) -> Result<Config> {
        Self::from_table_with(doc, overrides, Config::validate)
    }

    /// [`Config::from_table`] with another validation than [`Config::validate`].
    pub fn from_table_with(
        mut doc: toml::Table,
        overrides: &[String],
        validate: impl Fn(&Config) -> Result<()>,
    ) -> Result<Config> {
        for ov in overrides {
            apply_override(&mut doc, ov)?;
        }
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
                let path = e.path().to_string();
                anyhow::anyhow!("key `{path}`: {}", e.into_inner())
            })?;
        validate(&cfg)?;
        Ok(cfg)
    }

    /// The resolved config as TOML (written to every run's output folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Checks values that parse but make no sense, as far as the config alone can tell (ranges,
    /// types, key combinations); each error names its key. The checks that need the model
    /// family or the task's module are in `crate::recipe::check`, which runs this one too.
    pub fn validate(&self) -> Result<()> {
        positive("optim.lr", self.optim.lr)?;
        positive("train.epochs", self.train.epochs as f64)?;
        positive("train.batch_size", self.train.batch_size as f64)?;
        positive("train.eval_every", self.train.eval_every as f64)?;
        positive(
            "optim.lr_reference_batch",
            self.optim.lr_reference_batch as f64,
        )?;
        positive("data.train_size", self.data.train_size as f64)?;
        positive("data.val_size", self.data.val_size as f64)?;
        positive("distill.temperature", self.distill.temperature)?;
        positive("distributed.timeout_s", self.distributed.timeout_s)?;
        positive("distributed.bucket_mb", self.distributed.bucket_mb)?;
        in_range("optim.momentum", self.optim.momentum, 0.0, 1.0)?;
        in_range("train.log_every", self.train.log_every as f64, 0.0, 1e9)?;
        in_range("optim.weight_decay", self.optim.weight_decay, 0.0, 1.0)?;
        in_range("optim.step_gamma", self.optim.step_gamma, 0.0, 1.0)?;
        in_range(
            "optim.warmup_epochs",
            self.optim.warmup_epochs,
            0.0,
            self.train.epochs as f64,
        )?;
        in_range(
            "optim.warmup_start_lr",
            self.optim.warmup_start_lr,
            0.0,
            f64::MAX,
        )?;
        in_range(
            "optim.clip_grad_norm",
            self.optim.clip_grad_norm,
            0.0,
            f64::MAX,
        )?;
        in_range(
            "optim.clip_grad_value",
            self.optim.clip_grad_value,
            0.0,
            f64::MAX,
        )?;
        in_range(
            "loss.label_smoothing",
            self.loss.label_smoothing,
            0.0,
            0.999,
        )?;
        in_range("mixup.alpha", self.mixup.alpha, 0.0, 100.0)?;
        self.validate_later_tricks()?;
        positive("optim.bn_bias_lr_scale", self.optim.bn_bias_lr_scale)?;
        positive("optim.lookahead_every", self.optim.lookahead_every as f64)?;
        in_range(
            "optim.lookahead_decay",
            self.optim.lookahead_decay,
            0.0,
            1.0,
        )?;
        let [t0, tp, t1] = self.optim.triangle;
        if !(t0 >= 0.0 && t1 >= 0.0 && tp > 0.0 && tp < 1.0) {
            bail!("key `optim.triangle` must be [start >= 0, peak position in (0, 1), end >= 0], got [{t0}, {tp}, {t1}]");
        }
        in_range("data.val_crop_ratio", self.data.val_crop_ratio, 0.01, 1.0)?;
        in_range("data.jitter", self.data.jitter, 0.0, 1.0)?;
        in_range("data.hue", self.data.hue, 0.0, 1.0)?;
        in_range("data.lighting", self.data.lighting, 0.0, 10.0)?;
        in_range(
            "distill.hard_weight",
            self.distill.hard_weight,
            0.0,
            f64::MAX,
        )?;
        in_range(
            "distill.soft_weight",
            self.distill.soft_weight,
            0.0,
            f64::MAX,
        )?;
        in_range(
            "finetune.backbone_lr_mult",
            self.finetune.backbone_lr_mult,
            0.0,
            f64::MAX,
        )?;
        let [a0, a1] = self.data.rrc_area;
        if !(0.0 < a0 && a0 <= a1 && a1 <= 1.0) {
            bail!("key `data.rrc_area` must satisfy 0 < min <= max <= 1, got [{a0}, {a1}]");
        }
        let [r0, r1] = self.data.rrc_aspect;
        if !(0.0 < r0 && r0 <= r1) {
            bail!("key `data.rrc_aspect` must satisfy 0 < min <= max, got [{r0}, {r1}]");
        }
        for (i, s) in self.data.std.iter().enumerate() {
            positive(&format!("data.std[{i}]"), *s)?;
        }
        if self.optim.step_epochs.windows(2).any(|w| w[0] >= w[1]) {
            bail!(
                "key `optim.step_epochs` must be strictly increasing, got {:?}",
                self.optim.step_epochs
            );
        }
        if self.mixup.off_epochs > self.train.epochs {
            bail!(
                "key `mixup.off_epochs` ({}) exceeds `train.epochs` ({})",
                self.mixup.off_epochs,
                self.train.epochs
            );
        }
        if self.model.num_classes < 0 {
            bail!(
                "key `model.num_classes` must be >= 0 (0 = from the dataset), got {}",
                self.model.num_classes
            );
        }
        Ok(())
    }

    /// The tricks of the later recipes (CutMix, random erasing, RandAugment / TrivialAugment,
    /// repeated augmentation, stochastic depth, BCE, AdamW and LAMB, EMA): [`Config::validate`]'s
    /// step for them.
    fn validate_later_tricks(&self) -> Result<()> {
        in_range("cutmix.alpha", self.cutmix.alpha, 0.0, 100.0)?;
        in_range("data.erase_prob", self.data.erase_prob, 0.0, 1.0)?;
        if self.data.erase_prob > 0.0 {
            let [a0, a1] = self.data.erase_area;
            let [r0, r1] = self.data.erase_aspect;
            if !(a0 > 0.0 && a0 <= a1 && a1 < 1.0) {
                bail!("key `data.erase_area` must satisfy 0 < min <= max < 1, got [{a0}, {a1}]");
            }
            if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
                bail!("key `data.erase_aspect` must satisfy 0 < min <= max, got [{r0}, {r1}]");
            }
            if self.data.on_device {
                bail!("key `data.erase_prob`: random erasing runs in the CPU loader; it is not available with data.on_device");
            }
        }
        if AutoAugmentPolicy::parse(&self.data.auto_augment)?.is_some() && self.data.on_device {
            bail!("key `data.auto_augment`: automatic augmentation runs in the CPU loader; it is not available with data.on_device");
        }
        if self.data.repeats == 0 {
            bail!("key `data.repeats` must be >= 1 (1 = off), got 0");
        }
        if self.data.repeats > 1 && self.data.on_device {
            bail!("key `data.repeats`: repeated augmentation is a sampler of the CPU loader; it is not available with data.on_device");
        }
        in_range("model.drop_path", self.model.drop_path, 0.0, 0.99)?;
        in_range("model.drop_rate", self.model.drop_rate, 0.0, 0.99)?;
        if let Some(t) = self.loss.bce_target_threshold {
            if self.loss.name != LossName::Bce {
                bail!("key `loss.bce_target_threshold` applies only with loss.name = \"bce\"");
            }
            in_range("loss.bce_target_threshold", t, 0.0, 0.999)?;
        }
        for (i, b) in self.optim.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                bail!("key `optim.betas`: β{} must be in [0, 1), got {b}", i + 1);
            }
        }
        if let Some(e) = self.optim.eps {
            positive("optim.eps", e)?;
        }
        if self.loss.name == LossName::Bce && !self.distill.teacher.is_empty() {
            bail!("key `loss.name` = \"bce\" with `distill.teacher`: the distillation loss is a cross entropy; use one or the other");
        }
        if !(0.0..1.0).contains(&self.ema.decay) {
            bail!(
                "key `ema.decay` must be in [0, 1) (0 = off), got {}",
                self.ema.decay
            );
        }
        positive("ema.every", self.ema.every as f64)?;
        positive("ema.warmup_gamma", self.ema.warmup_gamma)?;
        positive("ema.warmup_power", self.ema.warmup_power)?;
        in_range("mixup.prob", self.mixup.prob, 0.0, 1.0)?;
        in_range("mixup.switch_prob", self.mixup.switch_prob, 0.0, 1.0)?;
        Ok(())
    }
}

impl Config {
    /// What parses and validates but probably is not what was meant: keys whose setting never
    /// takes effect within `train.epochs` (a step of the lr schedule at or after the last epoch,
    /// mixup switched off for the whole run, a warm-up as long as the run). Each names its keys;
    /// `tricks train` and `--check` print them.
    pub fn warnings(&self) -> Vec<String> {
        let epochs = self.train.epochs;
        let mut out = Vec::new();
        if self.optim.schedule == Schedule::Step {
            let late: Vec<usize> = self
                .optim
                .step_epochs
                .iter()
                .copied()
                .filter(|&e| e >= epochs)
                .collect();
            if !late.is_empty() {
                let what = if late.len() == self.optim.step_epochs.len() {
                    "the lr never decays"
                } else {
                    "the lr does not decay there"
                };
                out.push(format!(
                    "key `optim.step_epochs`: {late:?} lie at or beyond `train.epochs` ({epochs}); {what}"
                ));
            }
        }
        if self.mixup.alpha > 0.0 && self.mixup.off_epochs >= epochs {
            out.push(format!(
                "key `mixup.off_epochs` ({}) covers all of `train.epochs` ({epochs}): mixup (`mixup.alpha` = {}) is never on",
                self.mixup.off_epochs, self.mixup.alpha
            ));
        }
        if self.cutmix.alpha > 0.0 && self.mixup.off_epochs >= epochs {
            out.push(format!(
                "key `mixup.off_epochs` ({}) covers all of `train.epochs` ({epochs}): CutMix (`cutmix.alpha` = {}) is never on",
                self.mixup.off_epochs, self.cutmix.alpha
            ));
        }
        if (self.mixup.alpha > 0.0 || self.cutmix.alpha > 0.0) && self.mixup.prob == 0.0 {
            out.push("key `mixup.prob` is 0: no batch is ever mixed".to_string());
        }
        if self.optim.warmup_epochs > 0.0 && self.optim.warmup_epochs >= epochs as f64 {
            out.push(format!(
                "key `optim.warmup_epochs` ({}) covers all of `train.epochs` ({epochs}): the lr rises for the whole run and never decays",
                self.optim.warmup_epochs
            ));
        }
        out
    }
}

/// A message with every overlong part cut: each word (a run without spaces) longer than
/// [`MAX_SHOWN`] characters keeps its first [`MAX_SHOWN`] followed by "… (N bytes)", and a
/// message still longer than 8 × [`MAX_SHOWN`] keeps its start and end around the same mark. So
/// a 10 MB config value in an error stays a line, and the key and problem around it stay readable.
pub fn shorten_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(4 * MAX_SHOWN));
    let mut rest = msg;
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        out.push_str(&shorten_value(word));
        let ws = tail.len() - tail.trim_start().len();
        out.push_str(&tail[..ws]);
        rest = &tail[ws..];
    }
    let limit = 8 * MAX_SHOWN;
    if out.len() <= limit {
        return out;
    }
    let head = floor_char(&out, limit / 2);
    let tail_start = ceil_char(&out, out.len() - limit / 4);
    format!(
        "{}… ({} bytes) …{}",
        &out[..head],
        tail_start - head,
        &out[tail_start..]
    )
}

/// How many characters of a long value a message shows.
pub const MAX_SHOWN: usize = 200;

/// `s` itself, or its first [`MAX_SHOWN`] characters and "… (N bytes)" when it is longer.
pub fn shorten_value(s: &str) -> String {
    match s.char_indices().nth(MAX_SHOWN) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Reads a config file as a TOML table, resolving `extends` chains.
pub fn load_table(path: &Path, depth: usize) -> Result<toml::Table> {
    if depth > 8 {
        bail!("{}: `extends` chain is too deep (a cycle?)", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut doc: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    match doc.remove("extends") {
        None => Ok(doc),
        Some(toml::Value::String(parent)) => {
            let parent_path = path.parent().unwrap_or(Path::new(".")).join(&parent);
            let mut base = load_table(&parent_path, depth + 1)
                .with_context(|| format!("{}: key `extends`", path.display()))?;
            merge(&mut base, doc);
            Ok(base)
        }
        Some(_) => bail!(
            "{}: key `extends` must be a file path string",
            path.display()
        ),
    }
}

/// Merges `over` into `base`: tables recursively, every other value replaced.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Applies one `a.b.c=value` override to a TOML table. The value is parsed as TOML
/// (`0.2`, `true`, `[30, 60]`, `"x"`); anything that does not parse is taken as a string.
pub fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("override `{assignment}` must look like key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = parse_value(raw);
    set_dotted(doc, key, value)
}

/// Sets a dotted key in a TOML table, creating intermediate tables.
pub fn set_dotted(doc: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("override key `{key}` is not a dotted key like optim.lr");
    }
    let mut table = doc;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| {
            format!(
                "override key `{key}`: `{}` is not a table",
                parts[..=i].join(".")
            )
        })?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// A TOML value from a command-line string; bare words become strings.
pub fn parse_value(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Keys that change how fast a run goes but not what it computes: the loader's threads, its
/// prefetch depth, page-locked batches (the loader's batches are the same whatever they are;
/// see `data::loader`), the collectives' timeout, and how often TensorBoard logs the training
/// loss. A resume may change them.
pub const RESUME_NEUTRAL_KEYS: &[&str] = &[
    "data.workers",
    "data.prefetch",
    "data.pin_memory",
    "distributed.timeout_s",
    "train.log_every",
];

/// One key whose value differs between two configs.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    /// The dotted key (`optim.lr`).
    pub key: String,
    /// Its value in the first and in the second config, as TOML (`unset` when absent).
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {} → {}", self.key, self.old, self.new)
    }
}

/// Every dotted key whose value differs between `a` and `b`, sorted by key.
pub fn diff(a: &Config, b: &Config) -> Vec<KeyChange> {
    fn flat(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let table = |c: &Config| {
        let mut m = std::collections::BTreeMap::new();
        flat(
            "",
            &toml::Value::try_from(c).expect("config serialises"),
            &mut m,
        );
        m
    };
    let (fa, fb) = (table(a), table(b));
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| KeyChange {
            key: k.clone(),
            old: fa.get(k).map_or("unset".into(), |s| s.clone()),
            new: fb.get(k).map_or("unset".into(), |s| s.clone()),
        })
        .collect()
}

/// `key`'s value must be positive and finite.
fn positive(key: &str, v: f64) -> Result<()> {
    if !(v > 0.0 && v.is_finite()) {
        bail!("key `{key}` must be a positive number, got {v}");
    }
    Ok(())
}

/// `key`'s value must lie in [lo, hi] (`hi = f64::MAX`: any finite number from lo).
fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v >= lo && v <= hi) {
        if hi == f64::MAX {
            bail!("key `{key}` must be a finite number >= {lo}, got {v}");
        }
        bail!("key `{key}` must be in [{lo}, {hi}], got {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_every_changed_key_with_both_values() {
        let a = Config::default();
        let mut b = a.clone();
        b.seed = 7;
        b.model.variant = "d".into();
        b.data.workers = 3;
        let d: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            d,
            vec![
                "`data.workers`: 0 → 3".to_string(),
                "`model.variant`: \"a\" → \"d\"".to_string(),
                format!("`seed`: {} → 7", a.seed),
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }

    fn err(text: &str, overrides: &[&str]) -> String {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::from_toml_str(text, &ov).unwrap_err())
    }

    #[test]
    fn defaults_are_the_paper_baseline_with_every_trick_off() {
        let c = Config::from_toml_str("", &[]).unwrap();
        assert_eq!(c.optim.lr, 0.1);
        assert_eq!(c.optim.momentum, 0.9);
        assert!(c.optim.nesterov);
        assert_eq!(c.optim.weight_decay, 1e-4);
        assert_eq!(c.optim.schedule, Schedule::Step);
        assert!(!c.optim.linear_scaling && !c.optim.no_bias_decay && !c.model.zero_gamma);
        assert_eq!(c.optim.warmup_epochs, 0.0);
        assert_eq!(c.loss.label_smoothing, 0.0);
        assert_eq!(c.mixup.alpha, 0.0);
        assert!(c.distill.teacher.is_empty());
        assert_eq!(c.train.precision, Precision::Fp32);
        assert_eq!(c.model.variant, "a");
    }

    #[test]
    fn pinned_batches_only_for_a_gpu() {
        let c = DataConfig::default();
        assert!(c.pin_memory);
        assert!(!c.for_device(tch::Device::Cpu).pin_memory);
        assert!(c.for_device(tch::Device::Cuda(0)).pin_memory);
        let off = DataConfig {
            pin_memory: false,
            ..c.clone()
        };
        assert!(!off.for_device(tch::Device::Cuda(0)).pin_memory);
        // Everything else is unchanged.
        assert_eq!(
            c.for_device(tch::Device::Cpu),
            DataConfig {
                pin_memory: false,
                ..c
            }
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = err("[optim]\nlrr = 0.2\n", &[]);
        assert!(e.contains("optim") && e.contains("lrr"), "{e}");
        let e = err("[train]\nepochs = \"ten\"\n", &[]);
        assert!(e.contains("train.epochs"), "{e}");
        let e = err("", &["optim.lrr=0.2"]);
        assert!(e.contains("lrr"), "{e}");
        let e = err("bogus = 1\n", &[]);
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn impossible_values_name_the_key() {
        for (text, key) in [
            ("[optim]\nlr = -0.1\n", "optim.lr"),
            ("[optim]\nlr = 0.0\n", "optim.lr"),
            ("[train]\nbatch_size = 0\n", "train.batch_size"),
            ("[train]\nepochs = 0\n", "train.epochs"),
            ("[loss]\nlabel_smoothing = 1.5\n", "loss.label_smoothing"),
            ("[optim]\nstep_epochs = [60, 30]\n", "optim.step_epochs"),
            ("[data]\nrrc_area = [0.5, 0.2]\n", "data.rrc_area"),
            ("[optim]\ntriangle = [0.2, 1.5, 0.1]\n", "optim.triangle"),
            (
                "[optim]\nbn_bias_lr_scale = 0.0\n",
                "optim.bn_bias_lr_scale",
            ),
            ("[optim]\nlookahead_every = 0\n", "optim.lookahead_every"),
            ("[data]\npad_mode = \"wrap\"\n", "data.pad_mode"),
        ] {
            let e = err(text, &[]);
            assert!(e.contains(key), "{text} → {e}");
        }
        let e = err("", &["train.batch_size=-3"]);
        assert!(e.contains("train.batch_size"), "{e}");
    }

    #[test]
    fn set_overrides_any_key_with_toml_values() {
        let c = Config::from_toml_str(
            "[optim]\nlr = 0.1\n",
            &[
                "optim.lr=0.2".into(),
                "optim.schedule=cosine".into(),
                "optim.step_epochs=[10, 20]".into(),
                "model.zero_gamma=true".into(),
                "seed=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 0.2);
        assert_eq!(c.optim.schedule, Schedule::Cosine);
        assert_eq!(c.optim.step_epochs, vec![10, 20]);
        assert!(c.model.zero_gamma);
        assert_eq!(c.seed, 7);
        assert!(Config::from_toml_str("", &["nonsense".into()]).is_err());
    }

    #[test]
    fn resolved_config_round_trips_through_toml() {
        let c = Config::from_toml_str("[mixup]\nalpha = 0.2\n", &[]).unwrap();
        assert_eq!(Config::from_toml_str(&c.to_toml(), &[]).unwrap(), c);
    }

    #[test]
    fn warnings_name_keys_that_never_take_effect() {
        let w = |ov: &[&str]| {
            let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
            Config::from_toml_str("", &ov).unwrap().warnings()
        };
        assert!(w(&[]).is_empty(), "{:?}", w(&[]));
        // configs/cifar10/resnet20.toml with --set train.epochs=2: the lr never decays.
        let v = w(&["train.epochs=2", "optim.step_epochs=[15, 22]"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("optim.step_epochs") && v[0].contains("never decays"),
            "{v:?}"
        );
        let v = w(&["train.epochs=20", "optim.step_epochs=[15, 22]"]);
        assert!(
            v[0].contains("[22]") && v[0].contains("not decay there"),
            "{v:?}"
        );
        // A cosine schedule ignores step_epochs.
        assert!(w(&["train.epochs=2", "optim.schedule=\"cosine\""]).is_empty());
        let v = w(&[
            "train.epochs=4",
            "optim.step_epochs=[2]",
            "mixup.alpha=0.2",
            "mixup.off_epochs=4",
        ]);
        assert!(v.len() == 1 && v[0].contains("mixup.off_epochs"), "{v:?}");
        let v = w(&[
            "train.epochs=4",
            "optim.step_epochs=[2]",
            "optim.warmup_epochs=4",
        ]);
        assert!(
            v.len() == 1 && v[0].contains("optim.warmup_epochs"),
            "{v:?}"
        );
    }

    #[test]
    fn unbounded_ranges_and_long_values_read_as_people_write_them() {
        let e = err("", &["optim.clip_grad_norm=-1.0"]);
        assert!(
            e.contains("optim.clip_grad_norm") && e.contains("finite number >= 0"),
            "{e}"
        );
        assert!(e.len() < 200, "{e}");
        let long = "x".repeat(10_000_000);
        let msg = format!("key `model.name`: unknown model \"{long}\"; expected resnet18");
        let short = shorten_message(&msg);
        assert!(short.len() < 1000, "{}", short.len());
        assert!(
            short.starts_with("key `model.name`: unknown model \"xxx"),
            "{short}"
        );
        assert!(short.contains("(10000003 bytes)") && short.ends_with("expected resnet18"));
        // A long value with spaces keeps its start and end.
        let spaced = format!("key `data.dir`: {} does not exist", "ab ".repeat(1_000_000));
        let short = shorten_message(&spaced);
        assert!(short.len() < 2000 && short.starts_with("key `data.dir`: ab"));
        assert!(short.ends_with("does not exist"), "{short}");
        // Short messages and multi-byte characters pass unchanged.
        assert_eq!(shorten_message("é – ok"), "é – ok");
        assert_eq!(
            shorten_value(&"é".repeat(300)).chars().count(),
            200 + 1 + 12
        );
    }

    #[test]
    fn extends_merges_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.toml"),
            "[optim]\nlr = 0.3\nmomentum = 0.8\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("child.toml"),
            "extends = \"base.toml\"\n[optim]\nlr = 0.5\n",
        )
        .unwrap();
        let c = Config::load(&dir.path().join("child.toml"), &[]).unwrap();
        assert_eq!((c.optim.lr, c.optim.momentum), (0.5, 0.8));
    }
}
