//! Joint image/mask transforms. Training (GluonCV's / mmseg's recipe): random scale in
//! `segment.scale` (the image resampled bilinearly by the data module's resampler, the mask by
//! nearest neighbour, so no class id is ever invented), zero padding on the right/bottom to at
//! least `crop_size` (the mask padded with `ignore_index`), a random `crop_size` square crop and,
//! with `data.flip`, a horizontal flip with probability ½. Evaluation: the full image, no
//! augmentation. Both use the same pixel-centre convention (+0.5), so image and mask stay aligned.

use super::dataset::Mask;
use crate::config::Config;
use crate::data::transforms::{hflip_in_place, resize, Transform};
use crate::data::Image;
use rand::Rng;

/// The mask resized to `out_w` x `out_h` by nearest neighbour with pixel centres at +0.5
/// (PIL's NEAREST, PyTorch's `nearest-exact`): source index `floor((i + 0.5) · in / out)`.
pub fn resize_mask_nearest(mask: &Mask, out_w: u32, out_h: u32) -> Mask {
    let src = |i: u32, out: u32, inp: u32| -> usize {
        ((((i as f64 + 0.5) * inp as f64 / out as f64).floor()) as i64).clamp(0, inp as i64 - 1)
            as usize
    };
    let xs: Vec<usize> = (0..out_w).map(|x| src(x, out_w, mask.width)).collect();
    let mut data = Vec::with_capacity(out_w as usize * out_h as usize);
    for y in 0..out_h {
        let row = src(y, out_h, mask.height) * mask.width as usize;
        data.extend(xs.iter().map(|&x| mask.data[row + x]));
    }
    Mask {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Size after scaling by `s` (rounded, at least 1).
pub fn scaled_size(width: u32, height: u32, s: f64) -> (u32, u32) {
    (
        ((width as f64 * s).round() as u32).max(1),
        ((height as f64 * s).round() as u32).max(1),
    )
}

/// Image (bilinear) and mask (nearest) scaled by `s`.
pub fn scale_pair(img: &Image, mask: &Mask, s: f64) -> (Image, Mask) {
    let (w, h) = scaled_size(img.width, img.height, s);
    if (w, h) == (img.width, img.height) {
        return (img.clone(), mask.clone());
    }
    (resize(img, w, h), resize_mask_nearest(mask, w, h))
}

/// The `width` x `height` window at (`x`, `y`) of the image padded on the right and bottom
/// (image with 0, mask with `ignore`) as far as the window needs.
pub fn pad_crop_pair(
    img: &Image,
    mask: &Mask,
    width: u32,
    height: u32,
    x: u32,
    y: u32,
    ignore: u8,
) -> (Image, Mask) {
    let mut out = Image::new(width, height);
    let mut out_mask = Mask::new(width, height, ignore);
    let w = img.width.saturating_sub(x).min(width) as usize;
    if w > 0 {
        for r in 0..height.min(img.height.saturating_sub(y)) {
            let sy = (y + r) as usize;
            let src = (sy * img.width as usize + x as usize) * 3;
            let dst = r as usize * width as usize * 3;
            out.rgb[dst..dst + 3 * w].copy_from_slice(&img.rgb[src..src + 3 * w]);
            let src = sy * mask.width as usize + x as usize;
            let dst = r as usize * width as usize;
            out_mask.data[dst..dst + w].copy_from_slice(&mask.data[src..src + w]);
        }
    }
    (out, out_mask)
}

/// Mirrors a mask left–right in place.
pub fn hflip_mask_in_place(mask: &mut Mask) {
    let w = mask.width as usize;
    for row in mask.data.chunks_exact_mut(w.max(1)) {
        row.reverse();
    }
}

/// The training and evaluation transforms of a segmentation config.
#[derive(Clone, Debug)]
pub struct JointTransform {
    pub crop_size: u32,
    pub scale: [f64; 2],
    pub flip: bool,
    pub ignore: u8,
    /// Normalisation with `data.mean` / `data.std` (the classification pipeline's lookup table).
    pub normalize: Transform,
}

impl JointTransform {
    pub fn new(cfg: &Config) -> JointTransform {
        JointTransform {
            crop_size: cfg.segment.crop_size,
            scale: cfg.segment.scale,
            flip: cfg.data.flip,
            ignore: cfg.segment.ignore_index.clamp(0, 255) as u8,
            normalize: Transform::new(&cfg.data),
        }
    }

    /// Random scale, pad, crop and flip (in that order; the draws come from `rng` in that
    /// order: scale, crop x, crop y, flip). Returns `crop_size` x `crop_size` u8 image and mask.
    pub fn train_pair(&self, img: &Image, mask: &Mask, rng: &mut impl Rng) -> (Image, Mask) {
        let [lo, hi] = self.scale;
        let s = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        let (scaled, scaled_mask) = scale_pair(img, mask, s);
        let c = self.crop_size;
        let x = rng.gen_range(0..=scaled.width.saturating_sub(c));
        let y = rng.gen_range(0..=scaled.height.saturating_sub(c));
        let (mut out, mut out_mask) = pad_crop_pair(&scaled, &scaled_mask, c, c, x, y, self.ignore);
        if self.flip && rng.gen_bool(0.5) {
            hflip_in_place(&mut out);
            hflip_mask_in_place(&mut out_mask);
        }
        (out, out_mask)
    }

    /// Writes `(x/255 − mean)/std` of `img` as CHW into `out` (3·w·h floats).
    pub fn normalize_into(&self, img: &Image, out: &mut [f32]) {
        self.normalize.normalize_u8_into(img, out);
    }
}
