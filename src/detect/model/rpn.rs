//! torchvision's `RegionProposalNetwork` and `RPNHead`: objectness and box deltas for every
//! anchor of every pyramid level; the proposals (the best-scored anchors, decoded, clipped and
//! de-duplicated per level); in training, the objectness and box losses over sampled anchors.

use super::anchors::AnchorGenerator;
use super::sampling::{BalancedPositiveNegativeSampler, Matcher};
use super::transform::ImageList;
use super::{select_rows, Target};
use crate::detect::boxes::{self, BoxCoder};
use rand_chacha::ChaCha8Rng;
use tch::nn;
use tch::{Kind, Reduction, Tensor};

/// The smallest side (pixels of the resized image) a proposal may have.
const MIN_PROPOSAL_SIZE: f64 = 1e-3;

/// smooth-L1's β in both box losses (torchvision's 1/9).
pub(crate) const SMOOTH_L1_BETA: f64 = 1.0 / 9.0;

/// A 1x1 or 3x3 conv with normal(0, 0.01) weights and zero bias (torchvision's `RPNHead` init).
fn head_conv(p: nn::Path, cin: i64, cout: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: k / 2,
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

/// A 3x3 conv + ReLU shared by all levels (`conv.0.0`), then per anchor an objectness logit
/// (`cls_logits`) and four box deltas (`bbox_pred`).
#[derive(Debug)]
pub struct RpnHead {
    conv: nn::Conv2D,
    cls_logits: nn::Conv2D,
    bbox_pred: nn::Conv2D,
}

impl RpnHead {
    pub fn new(p: &nn::Path, in_channels: i64, num_anchors: i64) -> RpnHead {
        RpnHead {
            conv: head_conv(p / "conv" / "0" / "0", in_channels, in_channels, 3),
            cls_logits: head_conv(p / "cls_logits", in_channels, num_anchors, 1),
            bbox_pred: head_conv(p / "bbox_pred", in_channels, num_anchors * 4, 1),
        }
    }

    /// Per level: the logits `[N, A, H, W]` and the deltas `[N, 4A, H, W]`.
    pub fn forward(&self, features: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
        features
            .iter()
            .map(|f| {
                let t = f.apply(&self.conv).relu();
                (t.apply(&self.cls_logits), t.apply(&self.bbox_pred))
            })
            .unzip()
    }
}

/// `[N, A·C, H, W]` → `[N, H·W·A, C]`: location-major, anchor-minor, the anchors' order.
fn permute_and_flatten(layer: &Tensor, channels: i64) -> Tensor {
    let s = layer.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    layer
        .view([n, -1, channels, h, w])
        .permute([0, 3, 4, 1, 2])
        .reshape([n, -1, channels])
}

/// torchvision's `concat_box_prediction_layers`: all levels' logits `[N·ΣHWA, 1]` and deltas
/// `[N·ΣHWA, 4]`, image-major.
fn concat_box_prediction_layers(box_cls: &[Tensor], box_regression: &[Tensor]) -> (Tensor, Tensor) {
    let cls: Vec<Tensor> = box_cls.iter().map(|c| permute_and_flatten(c, 1)).collect();
    let reg: Vec<Tensor> = box_regression
        .iter()
        .map(|r| permute_and_flatten(r, 4))
        .collect();
    (
        Tensor::cat(&cls, 1).flatten(0, -2),
        Tensor::cat(&reg, 1).reshape([-1, 4]),
    )
}

/// The settings that differ between training and evaluation.
#[derive(Debug, Clone, Copy)]
pub struct TopN {
    pub training: i64,
    pub testing: i64,
}

impl TopN {
    fn get(&self, train: bool) -> i64 {
        if train {
            self.training
        } else {
            self.testing
        }
    }
}

/// The RPN's raw predictions for a batch, kept for its losses.
#[derive(Debug)]
pub struct RpnPredictions {
    /// Objectness logits, `[N·A_total, 1]`.
    pub objectness: Tensor,
    /// Box deltas, `[N·A_total, 4]`.
    pub pred_bbox_deltas: Tensor,
    /// The anchors of one image, `[A_total, 4]` (the same for every image of the batch).
    pub anchors: Tensor,
}

/// torchvision's `RegionProposalNetwork`.
#[derive(Debug)]
pub struct RegionProposalNetwork {
    pub anchor_generator: AnchorGenerator,
    pub head: RpnHead,
    pub box_coder: BoxCoder,
    pub proposal_matcher: Matcher,
    pub fg_bg_sampler: BalancedPositiveNegativeSampler,
    /// Proposals kept per level before NMS.
    pub pre_nms_top_n: TopN,
    /// Proposals kept per image after NMS.
    pub post_nms_top_n: TopN,
    pub nms_thresh: f64,
    /// Proposals need a probability of at least this.
    pub score_thresh: f64,
}

impl RegionProposalNetwork {
    /// The proposals of every image (`[P_i, 4]` in the resized image's coordinates, best first)
    /// and the predictions they came from. `train` picks the training or testing top-n.
    pub fn forward(
        &self,
        images: &ImageList,
        features: &[Tensor],
        train: bool,
    ) -> (Vec<Tensor>, RpnPredictions) {
        let (objectness, pred_bbox_deltas) = self.head.forward(features);
        let batch = images.tensors.size();
        let grid_sizes: Vec<(i64, i64)> = features
            .iter()
            .map(|f| (f.size()[2], f.size()[3]))
            .collect();
        let anchors = self.anchor_generator.grid_anchors(
            (batch[2], batch[3]),
            &grid_sizes,
            (features[0].kind(), features[0].device()),
        );
        let num_images = batch[0];
        let num_anchors_per_level: Vec<i64> = objectness
            .iter()
            .map(|o| o.size()[1] * o.size()[2] * o.size()[3])
            .collect();
        let (objectness, pred_bbox_deltas) =
            concat_box_prediction_layers(&objectness, &pred_bbox_deltas);
        let proposals = self
            .box_coder
            .decode(&pred_bbox_deltas.detach(), &anchors.repeat([num_images, 1]))
            .view([num_images, -1, 4]);
        let boxes = self.filter_proposals(
            &proposals,
            &objectness,
            &images.image_sizes,
            &num_anchors_per_level,
            train,
        );
        (
            boxes,
            RpnPredictions {
                objectness,
                pred_bbox_deltas,
                anchors,
            },
        )
    }

    /// Per image: the top `pre_nms_top_n` anchors of each level by objectness, their decoded
    /// boxes clipped to the image, those with both sides ≥ 1e-3 and probability ≥
    /// `score_thresh`, NMS within each level, the best `post_nms_top_n`.
    fn filter_proposals(
        &self,
        proposals: &Tensor,
        objectness: &Tensor,
        image_shapes: &[(i64, i64)],
        num_anchors_per_level: &[i64],
        train: bool,
    ) -> Vec<Tensor> {
        let num_images = proposals.size()[0];
        let device = proposals.device();
        let objectness = objectness.detach().reshape([num_images, -1]);
        let pre_nms_top_n = self.pre_nms_top_n.get(train);
        let mut top_n_idx = Vec::new();
        let mut levels = Vec::new();
        let mut offset = 0;
        for (level, (ob, &n)) in objectness
            .split_with_sizes(num_anchors_per_level, 1)
            .iter()
            .zip(num_anchors_per_level)
            .enumerate()
        {
            let (_, idx) = ob.topk(pre_nms_top_n.min(n), 1, true, true);
            levels.push(Tensor::full(
                idx.size(),
                level as i64,
                (Kind::Int64, device),
            ));
            top_n_idx.push(idx + offset);
            offset += n;
        }
        let top_n_idx = Tensor::cat(&top_n_idx, 1);
        let levels = Tensor::cat(&levels, 1);
        let objectness_prob = objectness.gather(1, &top_n_idx, false).sigmoid();
        let proposals =
            proposals.gather(1, &top_n_idx.unsqueeze(2).expand([-1, -1, 4], false), false);
        let post_nms_top_n = self.post_nms_top_n.get(train);
        image_shapes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| {
                let i = i as i64;
                let boxes = boxes::clip_boxes_to_image(&proposals.get(i), h, w);
                let (scores, lvl) = (objectness_prob.get(i), levels.get(i));
                let keep = boxes::remove_small_boxes(&boxes, MIN_PROPOSAL_SIZE);
                let (boxes, scores, lvl) = select_rows(&keep, (&boxes, &scores, &lvl));
                let keep = scores.ge(self.score_thresh).nonzero().view([-1]);
                let (boxes, scores, lvl) = select_rows(&keep, (&boxes, &scores, &lvl));
                let keep = boxes::batched_nms(&boxes, &scores, &lvl, self.nms_thresh);
                let keep = keep.narrow(0, 0, keep.size()[0].min(post_nms_top_n));
                boxes.index_select(0, &keep)
            })
            .collect()
    }

    /// The objectness loss (binary cross-entropy over the sampled anchors) and the box loss
    /// (smooth-L1, β = 1/9, summed over the sampled positives, divided by the number sampled).
    /// `targets` in the resized images' coordinates.
    pub fn losses(
        &self,
        predictions: &RpnPredictions,
        targets: &[Target],
        rngs: &mut [ChaCha8Rng],
    ) -> (Tensor, Tensor) {
        let anchors = &predictions.anchors;
        let mut labels = Vec::new();
        let mut regression_targets = Vec::new();
        let mut sampled_pos = Vec::new();
        let mut sampled_neg = Vec::new();
        for (target, rng) in targets.iter().zip(rngs.iter_mut()) {
            let (labels_per_image, matched_gt_boxes) =
                self.assign_targets_to_anchors(anchors, target);
            regression_targets.push(self.box_coder.encode(&matched_gt_boxes, anchors));
            let (pos, neg) = self.fg_bg_sampler.sample(&labels_per_image, rng);
            sampled_pos.push(pos);
            sampled_neg.push(neg);
            labels.push(labels_per_image);
        }
        let sampled_pos_inds = Tensor::cat(&sampled_pos, 0).nonzero().view([-1]);
        let sampled_neg_inds = Tensor::cat(&sampled_neg, 0).nonzero().view([-1]);
        let sampled_inds = Tensor::cat(&[&sampled_pos_inds, &sampled_neg_inds], 0);
        let objectness = predictions.objectness.flatten(0, -1);
        let labels = Tensor::cat(&labels, 0);
        let regression_targets = Tensor::cat(&regression_targets, 0);
        let box_loss = predictions
            .pred_bbox_deltas
            .index_select(0, &sampled_pos_inds)
            .smooth_l1_loss(
                &regression_targets.index_select(0, &sampled_pos_inds),
                Reduction::Sum,
                SMOOTH_L1_BETA,
            )
            / sampled_inds.size()[0] as f64;
        let objectness_loss = objectness
            .index_select(0, &sampled_inds)
            .binary_cross_entropy_with_logits::<Tensor>(
                &labels.index_select(0, &sampled_inds),
                None,
                None,
                Reduction::Mean,
            );
        (objectness_loss, box_loss)
    }

    /// For one image: each anchor's label (1 matched, 0 background, -1 ignored; f32) and the
    /// box of its matched ground truth (zeros where unmatched).
    fn assign_targets_to_anchors(&self, anchors: &Tensor, target: &Target) -> (Tensor, Tensor) {
        let gt_boxes = &target.boxes;
        if gt_boxes.numel() == 0 {
            return (
                Tensor::zeros([anchors.size()[0]], (Kind::Float, anchors.device())),
                anchors.zeros_like(),
            );
        }
        let match_quality_matrix = boxes::box_iou(gt_boxes, anchors);
        let matched_idxs = self.proposal_matcher.call(&match_quality_matrix);
        let matched_gt_boxes = gt_boxes.index_select(0, &matched_idxs.clamp_min(0));
        let labels = matched_idxs
            .ge(0)
            .to_kind(Kind::Float)
            .masked_fill(&matched_idxs.eq(Matcher::BETWEEN_THRESHOLDS), -1.0);
        (labels, matched_gt_boxes)
    }
}
