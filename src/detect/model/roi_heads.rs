//! torchvision's `RoIHeads` for boxes: pool each proposal's features, two fully connected layers
//! (`TwoMLPHead`), class scores and per-class box deltas (`FastRCNNPredictor`); in training the
//! Fast R-CNN loss over sampled proposals, in evaluation the final detections.

use super::poolers::MultiScaleRoIAlign;
use super::rpn::SMOOTH_L1_BETA;
use super::sampling::{BalancedPositiveNegativeSampler, Matcher};
use super::{select_rows, Target};
use crate::detect::boxes::{self, BoxCoder};
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

/// The smallest side (pixels of the resized image) a detection may have.
const MIN_DETECTION_SIZE: f64 = 1e-2;

/// torchvision's `TwoMLPHead`: flatten, `fc6` + ReLU, `fc7` + ReLU (nn.Linear's default init).
#[derive(Debug)]
pub struct TwoMlpHead {
    fc6: nn::Linear,
    fc7: nn::Linear,
}

impl TwoMlpHead {
    pub fn new(p: &nn::Path, in_channels: i64, representation_size: i64) -> TwoMlpHead {
        TwoMlpHead {
            fc6: nn::linear(
                p / "fc6",
                in_channels,
                representation_size,
                Default::default(),
            ),
            fc7: nn::linear(
                p / "fc7",
                representation_size,
                representation_size,
                Default::default(),
            ),
        }
    }
}

impl Module for TwoMlpHead {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.flatten(1, -1)
            .apply(&self.fc6)
            .relu()
            .apply(&self.fc7)
            .relu()
    }
}

/// torchvision's `FastRCNNPredictor`: class logits (`cls_score`, background = class 0) and
/// four box deltas per class (`bbox_pred`).
#[derive(Debug)]
pub struct FastRcnnPredictor {
    cls_score: nn::Linear,
    bbox_pred: nn::Linear,
}

impl FastRcnnPredictor {
    pub fn new(p: &nn::Path, in_channels: i64, num_classes: i64) -> FastRcnnPredictor {
        FastRcnnPredictor {
            cls_score: nn::linear(
                p / "cls_score",
                in_channels,
                num_classes,
                Default::default(),
            ),
            bbox_pred: nn::linear(
                p / "bbox_pred",
                in_channels,
                num_classes * 4,
                Default::default(),
            ),
        }
    }

    /// `(class_logits [R, K], box_regression [R, 4K])`.
    pub fn forward(&self, x: &Tensor) -> (Tensor, Tensor) {
        let x = x.flatten(1, -1);
        (x.apply(&self.cls_score), x.apply(&self.bbox_pred))
    }
}

/// The detections of one image, in the resized image's coordinates.
#[derive(Debug)]
pub struct ImageDetections {
    pub boxes: Tensor,
    pub scores: Tensor,
    pub labels: Tensor,
}

/// torchvision's `RoIHeads` (boxes only).
#[derive(Debug)]
pub struct RoiHeads {
    pub box_roi_pool: MultiScaleRoIAlign,
    pub box_head: TwoMlpHead,
    pub box_predictor: FastRcnnPredictor,
    pub box_coder: BoxCoder,
    pub proposal_matcher: Matcher,
    pub fg_bg_sampler: BalancedPositiveNegativeSampler,
    /// A detection needs a class probability above this.
    pub score_thresh: f64,
    /// NMS IoU threshold, per class.
    pub nms_thresh: f64,
    pub detections_per_img: i64,
}

impl RoiHeads {
    /// Class logits and box deltas of `proposals` (per image, resized coordinates).
    fn predict(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_shapes: &[(i64, i64)],
    ) -> (Tensor, Tensor) {
        let box_features = self.box_roi_pool.forward(features, proposals, image_shapes);
        self.box_predictor
            .forward(&self.box_head.forward(&box_features))
    }

    /// The Fast R-CNN losses `(classifier, box_reg)`: the ground-truth boxes join each image's
    /// proposals, the matcher labels them, the sampler draws from the image's `rngs[i]`, then torchvision's
    /// `fastrcnn_loss`. `features` are the pooled levels; `targets` in resized coordinates.
    pub fn losses(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_shapes: &[(i64, i64)],
        targets: &[Target],
        rngs: &mut [ChaCha8Rng],
    ) -> (Tensor, Tensor) {
        let (proposals, labels, regression_targets) =
            self.select_training_samples(proposals, targets, rngs);
        let (class_logits, box_regression) = self.predict(features, &proposals, image_shapes);
        fastrcnn_loss(&class_logits, &box_regression, &labels, &regression_targets)
    }

    /// torchvision's `select_training_samples`: per image the sampled proposals (with the
    /// ground truth added), their class labels and regression targets, concatenated over images
    /// for the last two.
    fn select_training_samples(
        &self,
        proposals: &[Tensor],
        targets: &[Target],
        rngs: &mut [ChaCha8Rng],
    ) -> (Vec<Tensor>, Tensor, Tensor) {
        let mut sampled_proposals = Vec::new();
        let mut labels = Vec::new();
        let mut matched_gt_boxes = Vec::new();
        for ((proposals_in_image, target), rng) in proposals.iter().zip(targets).zip(rngs) {
            let gt_boxes = target.boxes.to_kind(proposals_in_image.kind());
            let proposals_in_image = Tensor::cat(&[proposals_in_image, &gt_boxes], 0);
            let (matched_idxs, labels_in_image) =
                self.assign_targets_to_proposals(&proposals_in_image, &gt_boxes, &target.labels);
            let (pos, neg) = self.fg_bg_sampler.sample(&labels_in_image, rng);
            let sampled_inds = pos.logical_or(&neg).nonzero().view([-1]);
            let gt_or_zero = if gt_boxes.numel() == 0 {
                Tensor::zeros([1, 4], (gt_boxes.kind(), gt_boxes.device()))
            } else {
                gt_boxes
            };
            matched_gt_boxes
                .push(gt_or_zero.index_select(0, &matched_idxs.index_select(0, &sampled_inds)));
            labels.push(labels_in_image.index_select(0, &sampled_inds));
            sampled_proposals.push(proposals_in_image.index_select(0, &sampled_inds));
        }
        let regression_targets = self.box_coder.encode(
            &Tensor::cat(&matched_gt_boxes, 0),
            &Tensor::cat(&sampled_proposals, 0),
        );
        (
            sampled_proposals,
            Tensor::cat(&labels, 0),
            regression_targets,
        )
    }

    /// Per proposal: the index of its matched ground truth (0 where unmatched) and its class
    /// (the ground truth's, 0 background, -1 ignored).
    fn assign_targets_to_proposals(
        &self,
        proposals: &Tensor,
        gt_boxes: &Tensor,
        gt_labels: &Tensor,
    ) -> (Tensor, Tensor) {
        let n = proposals.size()[0];
        if gt_boxes.numel() == 0 {
            let zeros = Tensor::zeros([n], (Kind::Int64, proposals.device()));
            return (zeros.shallow_clone(), zeros);
        }
        let match_quality_matrix = boxes::box_iou(gt_boxes, proposals);
        let matched_idxs = self.proposal_matcher.call(&match_quality_matrix);
        let clamped = matched_idxs.clamp_min(0);
        let labels = gt_labels
            .index_select(0, &clamped)
            .to_kind(Kind::Int64)
            .masked_fill(&matched_idxs.eq(Matcher::BELOW_LOW_THRESHOLD), 0)
            .masked_fill(&matched_idxs.eq(Matcher::BETWEEN_THRESHOLDS), -1);
        (clamped, labels)
    }

    /// The detections of each image (resized coordinates): torchvision's
    /// `postprocess_detections` on the predictions for `proposals`.
    pub fn detect(
        &self,
        features: &[Tensor],
        proposals: &[Tensor],
        image_shapes: &[(i64, i64)],
    ) -> Vec<ImageDetections> {
        let (class_logits, box_regression) = self.predict(features, proposals, image_shapes);
        self.postprocess_detections(&class_logits, &box_regression, proposals, image_shapes)
    }

    /// Per image: every (proposal, class ≥ 1) pair as a box decoded with that class's deltas and
    /// clipped, scored by the softmax; those scoring above `score_thresh` with both sides ≥
    /// 1e-2, NMS per class, the best `detections_per_img`.
    fn postprocess_detections(
        &self,
        class_logits: &Tensor,
        box_regression: &Tensor,
        proposals: &[Tensor],
        image_shapes: &[(i64, i64)],
    ) -> Vec<ImageDetections> {
        let num_classes = class_logits.size()[1];
        let boxes_per_image: Vec<i64> = proposals.iter().map(|p| p.size()[0]).collect();
        let pred_boxes = self
            .box_coder
            .decode(box_regression, &Tensor::cat(proposals, 0));
        let pred_scores = class_logits.softmax(-1, None);
        let pred_boxes = pred_boxes.split_with_sizes(&boxes_per_image, 0);
        let pred_scores = pred_scores.split_with_sizes(&boxes_per_image, 0);
        pred_boxes
            .iter()
            .zip(&pred_scores)
            .zip(image_shapes)
            .map(|((boxes, scores), &(h, w))| {
                let n = boxes.size()[0];
                let boxes = boxes::clip_boxes_to_image(&boxes.reshape([-1, 4]), h, w).view([
                    n,
                    num_classes,
                    4,
                ]);
                let labels = Tensor::arange(num_classes, (Kind::Int64, scores.device()))
                    .view([1, -1])
                    .expand_as(scores);
                // Class 0 is the background.
                let boxes = boxes.narrow(1, 1, num_classes - 1).reshape([-1, 4]);
                let scores = scores.narrow(1, 1, num_classes - 1).reshape([-1]);
                let labels = labels.narrow(1, 1, num_classes - 1).reshape([-1]);
                let inds = scores.gt(self.score_thresh).nonzero().view([-1]);
                let (boxes, scores, labels) = select_rows(&inds, (&boxes, &scores, &labels));
                let keep = boxes::remove_small_boxes(&boxes, MIN_DETECTION_SIZE);
                let (boxes, scores, labels) = select_rows(&keep, (&boxes, &scores, &labels));
                let keep = boxes::batched_nms(&boxes, &scores, &labels, self.nms_thresh);
                let keep = keep.narrow(0, 0, keep.size()[0].min(self.detections_per_img));
                let (boxes, scores, labels) = select_rows(&keep, (&boxes, &scores, &labels));
                ImageDetections {
                    boxes,
                    scores,
                    labels,
                }
            })
            .collect()
    }
}

/// torchvision's `fastrcnn_loss`: cross-entropy of the class logits, and smooth-L1 (β = 1/9)
/// of the true class's box deltas over the positives, summed and divided by the number of
/// sampled proposals.
pub fn fastrcnn_loss(
    class_logits: &Tensor,
    box_regression: &Tensor,
    labels: &Tensor,
    regression_targets: &Tensor,
) -> (Tensor, Tensor) {
    let classification_loss =
        class_logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, 0.0);
    let sampled_pos_inds_subset = labels.gt(0).nonzero().view([-1]);
    let labels_pos = labels.index_select(0, &sampled_pos_inds_subset);
    let n = class_logits.size()[0];
    let box_regression = box_regression.reshape([n, -1, 4]);
    let box_loss = box_regression
        .index(&[Some(&sampled_pos_inds_subset), Some(&labels_pos)])
        .smooth_l1_loss(
            &regression_targets.index_select(0, &sampled_pos_inds_subset),
            Reduction::Sum,
            SMOOTH_L1_BETA,
        )
        / labels.size()[0] as f64;
    (classification_loss, box_loss)
}
