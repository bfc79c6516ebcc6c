//! torchvision's `MultiScaleRoIAlign`: each box is pooled (RoIAlign) from the pyramid level that
//! fits its size (`LevelMapper`, the FPN paper's eq. 1).

use crate::detect::boxes;
use crate::detect::roi_align::roi_align;
use tch::{Kind, Tensor};

/// torchvision's `LevelMapper`: level `floor(k0 + log2(√area / s0) + ε)`, clamped to
/// `[k_min, k_max]`, returned relative to `k_min` (an index into the pooled levels).
#[derive(Debug, Clone, Copy)]
pub struct LevelMapper {
    pub k_min: i64,
    pub k_max: i64,
    /// `s0`: a box of this side maps to `canonical_level`.
    pub canonical_scale: f64,
    /// `k0`.
    pub canonical_level: f64,
    pub eps: f64,
}

impl LevelMapper {
    /// The default canonical scale (224) and level (4), ε = 1e-6.
    pub fn new(k_min: i64, k_max: i64) -> LevelMapper {
        LevelMapper {
            k_min,
            k_max,
            canonical_scale: 224.0,
            canonical_level: 4.0,
            eps: 1e-6,
        }
    }

    /// The level index (`[R]` i64) of each box of `boxes` (`[R, 4]`), computed in the boxes'
    /// dtype as torchvision does.
    pub fn call(&self, boxes: &Tensor) -> Tensor {
        let s = boxes::box_area(boxes).sqrt();
        let eps = Tensor::from(self.eps)
            .to_kind(s.kind())
            .to_device(s.device());
        let target_lvls = ((s / self.canonical_scale).log2() + self.canonical_level + eps).floor();
        target_lvls
            .clamp(self.k_min as f64, self.k_max as f64)
            .to_kind(Kind::Int64)
            - self.k_min
    }
}

/// torchvision's `_infer_scale`: the power of two nearest to `feature / image` (heights; the
/// log rounded half to even, in f32).
fn infer_scale(feature_height: i64, image_height: i64) -> f64 {
    let approx_scale = feature_height as f64 / image_height as f64;
    let log2 = (approx_scale as f32).log2().round_ties_even();
    2f64.powf(log2 as f64)
}

/// RoIAlign over several pyramid levels, each box on the level [`LevelMapper`] gives it.
#[derive(Debug, Clone, Copy)]
pub struct MultiScaleRoIAlign {
    /// Output height and width of each pooled box.
    pub output_size: (i64, i64),
    pub sampling_ratio: i64,
}

impl MultiScaleRoIAlign {
    /// The scale of each of `features` (their heights against the largest image height) and the
    /// level mapper from the first and last, as torchvision's `_setup_scales`. (torchvision
    /// infers them on its first call and keeps them; they do not change with the batch unless an
    /// image is far smaller than the stride-32 padding.)
    pub fn setup_scales(
        features: &[Tensor],
        image_shapes: &[(i64, i64)],
    ) -> (Vec<f64>, LevelMapper) {
        let max_h = image_shapes
            .iter()
            .map(|s| s.0)
            .max()
            .expect("at least one image");
        let scales: Vec<f64> = features
            .iter()
            .map(|f| infer_scale(f.size()[2], max_h))
            .collect();
        let level = |scale: f64| -(scale as f32).log2() as i64;
        let mapper = LevelMapper::new(level(scales[0]), level(scales[scales.len() - 1]));
        (scales, mapper)
    }

    /// The pooled features `[R, C, oh, ow]` of every image's boxes (in the resized images'
    /// coordinates), image by image, from `features` (the levels to pool from, highest
    /// resolution first).
    pub fn forward(
        &self,
        features: &[Tensor],
        boxes: &[Tensor],
        image_shapes: &[(i64, i64)],
    ) -> Tensor {
        let (scales, mapper) = Self::setup_scales(features, image_shapes);
        let concat_boxes = Tensor::cat(boxes, 0);
        let ids: Vec<Tensor> = boxes
            .iter()
            .enumerate()
            .map(|(i, b)| Tensor::full([b.size()[0], 1], i as f64, (b.kind(), b.device())))
            .collect();
        let rois = Tensor::cat(&[Tensor::cat(&ids, 0), concat_boxes.shallow_clone()], 1);
        let pool = |feature: &Tensor, rois: &Tensor, scale: f64| {
            roi_align(
                feature,
                rois,
                self.output_size,
                scale,
                self.sampling_ratio,
                false,
            )
        };
        if features.len() == 1 {
            return pool(&features[0], &rois, scales[0]);
        }
        let levels = mapper.call(&concat_boxes);
        let mut order = Vec::new();
        let mut pooled = Vec::new();
        for (level, (feature, &scale)) in features.iter().zip(&scales).enumerate() {
            let idx_in_level = levels.eq(level as i64).nonzero().view([-1]);
            pooled.push(pool(feature, &rois.index_select(0, &idx_in_level), scale));
            order.push(idx_in_level);
        }
        // Every box is on exactly one level: scatter the per-level results back to box order.
        let pooled = Tensor::cat(&pooled, 0);
        let size = pooled.size();
        let result = Tensor::zeros(
            [rois.size()[0], size[1], size[2], size[3]],
            (pooled.kind(), pooled.device()),
        );
        result.index_copy(0, &Tensor::cat(&order, 0), &pooled)
    }
}
