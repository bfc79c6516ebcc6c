//! Faster R-CNN with a feature pyramid, torchvision's `fasterrcnn_resnet50_fpn` design on any
//! ImageNet ResNet of this project's family. Parameter names are torchvision's
//! (`backbone.body.*`, `backbone.fpn.*`, `rpn.head.*`, `roi_heads.box_head.*`,
//! `roi_heads.box_predictor.*`), so its state dicts load by name ([`load_torchvision`]).
//!
//! * [`transform`]: normalise, resize by the shorter side, pad into a batch; map boxes back.
//! * [`backbone`]: the ResNet body and the FPN (P2–P6).
//! * [`anchors`]: one anchor size per level, three aspect ratios.
//! * [`rpn`]: the region proposal network, its proposals and losses.
//! * [`poolers`]: multi-scale RoIAlign.
//! * [`roi_heads`]: the box head and predictor, the Fast R-CNN loss, the final detections.
//! * [`sampling`]: the matcher and the balanced positive/negative sampler both stages use.

pub mod anchors;
pub mod backbone;
pub mod poolers;
pub mod roi_heads;
pub mod rpn;
pub mod sampling;
pub mod transform;

use crate::detect::boxes::BoxCoder;
use crate::model::ModelSpec;
use anchors::AnchorGenerator;
use anyhow::{bail, Context, Result};
use backbone::{BackboneWithFpn, FPN_CHANNELS};
use poolers::MultiScaleRoIAlign;
use rand_chacha::ChaCha8Rng;
use roi_heads::{FastRcnnPredictor, RoiHeads, TwoMlpHead};
use rpn::{RegionProposalNetwork, RpnHead, TopN};
use sampling::{BalancedPositiveNegativeSampler, Matcher};
use std::collections::HashSet;
use std::path::Path;
use tch::{nn, Tensor};
use transform::{resize_boxes, GeneralizedRcnnTransform, ImageList};

/// Prefix of the backbone ResNet's variables in a [`FasterRcnn`] built at a VarStore's root.
pub const BODY_PREFIX: &str = "backbone.body.";

/// Side of the RoIAlign output (torchvision's `output_size=7`).
const ROI_OUTPUT_SIZE: i64 = 7;
/// RoIAlign's sampling points per bin and axis.
const ROI_SAMPLING_RATIO: i64 = 2;
/// Width of `fc6` and `fc7`.
const REPRESENTATION_SIZE: i64 = 1024;
/// The pooled levels: `'0'`…`'3'` of the pyramid, not `'pool'`.
const POOLED_LEVELS: usize = 4;

/// Every size and threshold of the detector; `Default` gives torchvision's.
#[derive(Debug, Clone, PartialEq)]
pub struct FasterRcnnOptions {
    /// Shorter side of the resized image in evaluation (training: the caller's per image).
    pub min_size: i64,
    /// Bound on the resized image's longer side.
    pub max_size: i64,
    /// Per-channel mean and standard deviation the images are normalised with.
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// The batch is padded to a multiple of this.
    pub size_divisible: i64,
    /// Anchor sizes (pixels) per pyramid level, `'0'`…`'pool'`.
    pub anchor_sizes: Vec<Vec<f64>>,
    /// Aspect ratios (height / width) per level; every level needs as many anchors.
    pub aspect_ratios: Vec<Vec<f64>>,
    /// Proposals kept per level before NMS, in training and in evaluation.
    pub rpn_pre_nms_top_n_train: i64,
    pub rpn_pre_nms_top_n_test: i64,
    /// Proposals kept per image after NMS.
    pub rpn_post_nms_top_n_train: i64,
    pub rpn_post_nms_top_n_test: i64,
    pub rpn_nms_thresh: f64,
    /// Anchor–box IoU from which an anchor is positive, and below which it is negative.
    pub rpn_fg_iou_thresh: f64,
    pub rpn_bg_iou_thresh: f64,
    /// Anchors sampled per image for the RPN loss, and the largest fraction of positives.
    pub rpn_batch_size_per_image: i64,
    pub rpn_positive_fraction: f64,
    /// Proposals need an objectness probability of at least this.
    pub rpn_score_thresh: f64,
    /// Detections need a class probability above this.
    pub box_score_thresh: f64,
    /// Per-class NMS IoU threshold of the detections.
    pub box_nms_thresh: f64,
    pub box_detections_per_img: i64,
    /// Proposal–box IoU from which a proposal takes the box's class, below which background.
    pub box_fg_iou_thresh: f64,
    pub box_bg_iou_thresh: f64,
    /// Proposals sampled per image for the Fast R-CNN loss, and the largest fraction of
    /// positives.
    pub box_batch_size_per_image: i64,
    pub box_positive_fraction: f64,
    /// Weights of the (x, y, w, h) box deltas of the second stage.
    pub bbox_reg_weights: [f64; 4],
    /// The backbone's batch norm always in evaluation mode with γ and β not trained
    /// (torchvision's `FrozenBatchNorm2d`); `false` trains it normally.
    pub frozen_bn: bool,
    /// How many backbone stages train, from the last (0…5; 5 adds the stem's conv and BN), as
    /// torchvision's `trainable_backbone_layers`. Applied by [`freeze_backbone`].
    pub trainable_layers: usize,
}

impl Default for FasterRcnnOptions {
    fn default() -> Self {
        FasterRcnnOptions {
            min_size: 800,
            max_size: 1333,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
            size_divisible: 32,
            anchor_sizes: [32.0, 64.0, 128.0, 256.0, 512.0]
                .iter()
                .map(|&s| vec![s])
                .collect(),
            aspect_ratios: vec![vec![0.5, 1.0, 2.0]; 5],
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
            bbox_reg_weights: [10.0, 10.0, 5.0, 5.0],
            frozen_bn: true,
            trainable_layers: 3,
        }
    }
}

impl FasterRcnnOptions {
    /// Refuses settings the model cannot be built with, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.min_size < 1 || self.max_size < 1 || self.size_divisible < 1 {
            bail!(
                "min_size ({}), max_size ({}) and size_divisible ({}) must be positive",
                self.min_size,
                self.max_size,
                self.size_divisible
            );
        }
        let levels = backbone::FEATURE_NAMES.len();
        if self.anchor_sizes.len() != levels || self.aspect_ratios.len() != levels {
            bail!(
                "anchor_sizes and aspect_ratios need one entry per pyramid level ({levels}: {:?}), got {} and {}",
                backbone::FEATURE_NAMES,
                self.anchor_sizes.len(),
                self.aspect_ratios.len()
            );
        }
        let per_location: HashSet<usize> = self
            .anchor_sizes
            .iter()
            .zip(&self.aspect_ratios)
            .map(|(s, r)| s.len() * r.len())
            .collect();
        if per_location.len() != 1 || per_location.contains(&0) {
            bail!(
                "every pyramid level needs the same, non-zero number of anchors (sizes × aspect_ratios), as the RPN head is shared; got {per_location:?}"
            );
        }
        for (name, fg, bg) in [
            ("rpn", self.rpn_fg_iou_thresh, self.rpn_bg_iou_thresh),
            ("box", self.box_fg_iou_thresh, self.box_bg_iou_thresh),
        ] {
            if bg > fg {
                bail!("{name}_bg_iou_thresh ({bg}) must not exceed {name}_fg_iou_thresh ({fg})");
            }
        }
        for (name, f) in [
            ("rpn_positive_fraction", self.rpn_positive_fraction),
            ("box_positive_fraction", self.box_positive_fraction),
        ] {
            if !(0.0..=1.0).contains(&f) {
                bail!("{name} must be in [0, 1], got {f}");
            }
        }
        if self.trainable_layers > 5 {
            bail!(
                "trainable_layers must be in 0..=5 (as torchvision's trainable_backbone_layers), got {}",
                self.trainable_layers
            );
        }
        Ok(())
    }
}

/// The ground truth of one image: boxes `[n, 4]` (f32, x1 y1 x2 y2, pixels of the image as
/// given) and their classes `[n]` (i64, 1..=K; 0 is the background).
#[derive(Debug)]
pub struct Target {
    pub boxes: Tensor,
    pub labels: Tensor,
}

/// The detections of one image, in its own (original) coordinates, best first within the
/// limit of `box_detections_per_img`.
#[derive(Debug)]
pub struct Detections {
    /// `[d, 4]` x1 y1 x2 y2.
    pub boxes: Tensor,
    /// `[d]` class probabilities.
    pub scores: Tensor,
    /// `[d]` i64 classes, 1..=K.
    pub labels: Tensor,
}

/// The four training losses (torchvision's `loss_objectness`, `loss_rpn_box_reg`,
/// `loss_classifier`, `loss_box_reg`).
#[derive(Debug)]
pub struct Losses {
    pub objectness: Tensor,
    pub rpn_box_reg: Tensor,
    pub classifier: Tensor,
    pub box_reg: Tensor,
}

impl Losses {
    /// The sum that training minimises (torchvision's reference sums the four, unweighted).
    pub fn total(&self) -> Tensor {
        &self.objectness + &self.rpn_box_reg + &self.classifier + &self.box_reg
    }
}

/// The detector: transform, backbone with FPN, RPN, RoI heads.
#[derive(Debug)]
pub struct FasterRcnn {
    transform: GeneralizedRcnnTransform,
    backbone: BackboneWithFpn,
    rpn: RegionProposalNetwork,
    roi_heads: RoiHeads,
    opts: FasterRcnnOptions,
}

impl FasterRcnn {
    /// The detector for `num_classes` classes, background included (torchvision's convention),
    /// on the backbone of `spec` (an ImageNet-layout ResNet) under `root`. Call
    /// [`freeze_backbone`] on the VarStore to freeze what torchvision freezes.
    pub fn new(
        root: &nn::Path,
        spec: &ModelSpec,
        num_classes: i64,
        opts: FasterRcnnOptions,
    ) -> Result<FasterRcnn> {
        opts.validate()?;
        if num_classes < 2 {
            bail!("num_classes counts the background, so it must be at least 2, got {num_classes}");
        }
        let backbone = BackboneWithFpn::new(&(root / "backbone"), spec)?;
        let anchor_generator = AnchorGenerator::new(&opts.anchor_sizes, &opts.aspect_ratios)?;
        let num_anchors = anchor_generator.num_anchors_per_location()[0];
        let rpn = RegionProposalNetwork {
            head: RpnHead::new(&(root / "rpn" / "head"), FPN_CHANNELS, num_anchors),
            anchor_generator,
            box_coder: BoxCoder::new([1.0, 1.0, 1.0, 1.0]),
            proposal_matcher: Matcher::new(opts.rpn_fg_iou_thresh, opts.rpn_bg_iou_thresh, true),
            fg_bg_sampler: BalancedPositiveNegativeSampler {
                batch_size_per_image: opts.rpn_batch_size_per_image,
                positive_fraction: opts.rpn_positive_fraction,
            },
            pre_nms_top_n: TopN {
                training: opts.rpn_pre_nms_top_n_train,
                testing: opts.rpn_pre_nms_top_n_test,
            },
            post_nms_top_n: TopN {
                training: opts.rpn_post_nms_top_n_train,
                testing: opts.rpn_post_nms_top_n_test,
            },
            nms_thresh: opts.rpn_nms_thresh,
            score_thresh: opts.rpn_score_thresh,
        };
        let heads = root / "roi_heads";
        let roi_heads = RoiHeads {
            box_roi_pool: MultiScaleRoIAlign {
                output_size: (ROI_OUTPUT_SIZE, ROI_OUTPUT_SIZE),
                sampling_ratio: ROI_SAMPLING_RATIO,
            },
            box_head: TwoMlpHead::new(
                &(&heads / "box_head"),
                FPN_CHANNELS * ROI_OUTPUT_SIZE * ROI_OUTPUT_SIZE,
                REPRESENTATION_SIZE,
            ),
            box_predictor: FastRcnnPredictor::new(
                &(&heads / "box_predictor"),
                REPRESENTATION_SIZE,
                num_classes,
            ),
            box_coder: BoxCoder::new(opts.bbox_reg_weights),
            proposal_matcher: Matcher::new(opts.box_fg_iou_thresh, opts.box_bg_iou_thresh, false),
            fg_bg_sampler: BalancedPositiveNegativeSampler {
                batch_size_per_image: opts.box_batch_size_per_image,
                positive_fraction: opts.box_positive_fraction,
            },
            score_thresh: opts.box_score_thresh,
            nms_thresh: opts.box_nms_thresh,
            detections_per_img: opts.box_detections_per_img,
        };
        let transform = GeneralizedRcnnTransform {
            max_size: opts.max_size,
            image_mean: opts.image_mean,
            image_std: opts.image_std,
            size_divisible: opts.size_divisible,
        };
        Ok(FasterRcnn {
            transform,
            backbone,
            rpn,
            roi_heads,
            opts,
        })
    }

    /// The options the model was built with.
    pub fn options(&self) -> &FasterRcnnOptions {
        &self.opts
    }

    /// Training: the four losses of a batch. `images` are `[3, H, W]` f32 in [0, 1] on the
    /// model's device, each resized to the shorter side `min_sizes[i]` (multi-scale training:
    /// the caller draws it); `targets` in the images' pixel coordinates. The samplers of image i
    /// draw from `rngs[i]` on the host (generators the caller derives from the seed, the step and
    /// the image's place in the global batch, so that a resumed run and a data-parallel one
    /// replay the same draws). Batch norm runs in training mode unless `frozen_bn`.
    ///
    /// # Panics
    /// On mismatched lengths, boxes not `[n, 4]`, labels not `[n]`, or a box with no positive
    /// width or height after resizing (torchvision asserts the same).
    pub fn losses(
        &self,
        images: &[Tensor],
        min_sizes: &[i64],
        targets: &[Target],
        rngs: &mut [ChaCha8Rng],
    ) -> Losses {
        assert_eq!(
            (images.len(), targets.len()),
            (rngs.len(), rngs.len()),
            "one target and one generator per image"
        );
        assert_eq!(
            images.len(),
            targets.len(),
            "one target per image: {} images, {} targets",
            images.len(),
            targets.len()
        );
        let image_list = self.transform.forward(images, min_sizes);
        let targets: Vec<Target> = targets
            .iter()
            .zip(images)
            .zip(&image_list.image_sizes)
            .enumerate()
            .map(|(i, ((target, image), &new_size))| {
                resized_target(i, target, original_size(image), new_size)
            })
            .collect();
        let features = self
            .backbone
            .forward(&image_list.tensors, !self.opts.frozen_bn);
        let (proposals, predictions) = self.rpn.forward(&image_list, &features, true);
        let (objectness, rpn_box_reg) = self.rpn.losses(&predictions, &targets, rngs);
        let (classifier, box_reg) = self.roi_heads.losses(
            &features[..POOLED_LEVELS],
            &proposals,
            &image_list.image_sizes,
            &targets,
            rngs,
        );
        Losses {
            objectness,
            rpn_box_reg,
            classifier,
            box_reg,
        }
    }

    /// Evaluation: the detections of each image (resized to `min_size`), boxes in the image's
    /// own coordinates. Turning gradients off (`tch::no_grad`) is the caller's business.
    pub fn detect(&self, images: &[Tensor]) -> Vec<Detections> {
        self.detect_with_proposals(images).1
    }

    /// [`FasterRcnn::detect`] and the RPN's proposals of each image (in the resized image's
    /// coordinates, as torchvision's RPN returns them).
    pub fn detect_with_proposals(&self, images: &[Tensor]) -> (Vec<Tensor>, Vec<Detections>) {
        let min_sizes = vec![self.opts.min_size; images.len()];
        let image_list: ImageList = self.transform.forward(images, &min_sizes);
        let features = self.backbone.forward(&image_list.tensors, false);
        let (proposals, _) = self.rpn.forward(&image_list, &features, false);
        let detections = self.roi_heads.detect(
            &features[..POOLED_LEVELS],
            &proposals,
            &image_list.image_sizes,
        );
        let detections = detections
            .into_iter()
            .zip(images)
            .zip(&image_list.image_sizes)
            .map(|((d, image), &resized)| Detections {
                boxes: resize_boxes(&d.boxes, resized, original_size(image)),
                scores: d.scores,
                labels: d.labels,
            })
            .collect();
        (proposals, detections)
    }
}

/// The rows `keep` (i64 indices) of three aligned tensors: boxes, their scores and their levels
/// or labels, as the filtering steps of both stages select them together.
pub(crate) fn select_rows(
    keep: &Tensor,
    (boxes, scores, groups): (&Tensor, &Tensor, &Tensor),
) -> (Tensor, Tensor, Tensor) {
    (
        boxes.index_select(0, keep),
        scores.index_select(0, keep),
        groups.index_select(0, keep),
    )
}

/// `(height, width)` of a `[C, H, W]` image.
fn original_size(image: &Tensor) -> (i64, i64) {
    let s = image.size();
    (s[s.len() - 2], s[s.len() - 1])
}

/// Target `i` with its boxes scaled from the image's `original` size to `resized`; panics on a
/// malformed target or a degenerate box, naming the image.
fn resized_target(i: usize, target: &Target, original: (i64, i64), resized: (i64, i64)) -> Target {
    let n = target.boxes.size()[0];
    assert!(
        target.boxes.dim() == 2 && target.boxes.size()[1] == 4,
        "target {i}: boxes must be [n, 4], got {:?}",
        target.boxes.size()
    );
    assert!(
        target.labels.size() == [n],
        "target {i}: {n} boxes but labels of shape {:?}",
        target.labels.size()
    );
    let boxes = resize_boxes(&target.boxes, original, resized);
    let degenerate = boxes
        .narrow(1, 2, 2)
        .le_tensor(&boxes.narrow(1, 0, 2))
        .any_dim(1, false)
        .nonzero();
    if degenerate.size()[0] > 0 {
        let b = degenerate.int64_value(&[0, 0]);
        let found: Vec<f64> =
            Vec::try_from(boxes.get(b).to_kind(tch::Kind::Double)).unwrap_or_default();
        panic!(
            "target {i}: all bounding boxes should have positive height and width; box {b} is {found:?} after resizing"
        );
    }
    Target {
        boxes,
        labels: target.labels.shallow_clone(),
    }
}

/// Freezes what torchvision freezes in a [`FasterRcnn`] built at `vs.root()`: the backbone
/// parameters outside the last `opts.trainable_layers` stages (torchvision's
/// `_resnet_fpn_extractor`), and with `opts.frozen_bn` every backbone batch norm's γ and β
/// (torchvision's `FrozenBatchNorm2d` has none to train). Everything else is made trainable,
/// so calling it again with other options takes effect.
pub fn freeze_backbone(vs: &nn::VarStore, opts: &FasterRcnnOptions) {
    let variables = vs.variables();
    // A batch norm is what has running statistics.
    let batch_norms: HashSet<&str> = variables
        .keys()
        .filter_map(|k| k.strip_suffix(".running_mean"))
        .collect();
    let layers = backbone::layers_to_train(opts.trainable_layers);
    for (name, var) in &variables {
        let Some(in_body) = name.strip_prefix(BODY_PREFIX) else {
            continue;
        };
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        if leaf.starts_with("running_") {
            continue;
        }
        let frozen_bn = opts.frozen_bn && batch_norms.contains(module);
        let trains = layers.iter().any(|l| in_body.starts_with(l)) && !frozen_bn;
        let _ = var.set_requires_grad(trains);
    }
}

/// Loads a torchvision Faster R-CNN state dict saved as safetensors (torchvision's names;
/// `num_batches_tracked` skipped) into `vs`; errors name the missing or unexpected tensors and
/// any shape mismatch.
pub fn load_torchvision(vs: &mut nn::VarStore, path: &Path) -> Result<()> {
    let ckpt = crate::checkpoint::load(path).with_context(|| {
        format!(
            "loading torchvision Faster R-CNN weights from {}",
            path.display()
        )
    })?;
    crate::checkpoint::copy_into(vs, &ckpt.tensors, path, None).with_context(|| {
        format!(
            "loading torchvision Faster R-CNN weights from {}",
            path.display()
        )
    })
}
