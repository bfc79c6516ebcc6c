//! Image transforms: pure functions on [`Image`] (u8 HWC) and [`FloatImage`] (f32 HWC, 0–1 scale),
//! plus [`Transform`], which chains them into the training and evaluation pipelines and writes the
//! normalised CHW floats straight into a batch buffer.
//!
//! * CIFAR train (He et al. 2016): zero-pad by `cifar_pad`, random `train_size` crop, random
//!   horizontal flip.
//! * ImageNet train (the paper §2, as in fb.resnet.torch / GluonCV): random-resized crop
//!   ([`random_resized_crop_rect`], torchvision's algorithm) resized bilinearly to `train_size`,
//!   flip, brightness / contrast / saturation (and hue, when `hue > 0`) in random order
//!   ([`draw_color_ops`]), PCA lighting noise ([`lighting_offset`]), normalisation.
//! * Evaluation: resize the shorter side to `round(val_size / val_crop_ratio)` (longer side
//!   truncated as torchvision does), centre-crop `val_size`; for the CIFAR pipeline an image that
//!   already is `val_size` x `val_size` is only normalised.
//!
//! Resampling is our own separable bilinear ("triangle") filter in the convention of PIL's
//! `BILINEAR` (what torchvision's PIL path uses): pixel centres at +0.5, and when downscaling the
//! filter support is widened by the scale factor (antialiasing). When upscaling it is exactly the
//! usual bilinear interpolation with half-pixel centres and edge clamping (PyTorch's
//! `align_corners=False`). It reads the source crop directly (no intermediate crop copy) and keeps
//! f32 precision until normalisation.
//!
//! The colour operations and the lighting noise are all affine maps of the RGB vector (contrast
//! uses the image's mean grey level, which is itself an affine function of the mean colour), so the
//! training pipeline composes them with the normalisation into one 3x3 matrix + offset per image
//! ([`color_affine`]) and applies it in a single pass; the per-op functions ([`adjust_brightness`],
//! ...) are the reference it is tested against. As in fb.resnet.torch and MXNet's float pipeline,
//! values are not clipped to [0, 1] between the colour operations.
//!
//! With `data.auto_augment` (RandAugment or TrivialAugmentWide, [`auto_augment`]) the training
//! pipelines apply it where torchvision's classification recipe does: after the crop and the
//! flip, on the u8 image, before the colour operations, normalisation and random erasing. The
//! ImageNet pipeline then materialises its resized crop as u8 (rounded to the nearest level, as
//! PIL's resize ends; PIL also rounds between its two passes, so a level may differ by 1 from
//! PIL's) and goes on from the augmented image; without it the fused path above is unchanged.
//! The operations match torchvision's uint8 kernels: exactly, but for the colour / contrast /
//! sharpness blends, which may differ by 1 level on ≤ 0.1 % of the values (see the
//! `auto_augment` module for how and why).
//!
//! The code is split by concern: `geometry` (pad / crop / flip / random-resized-crop rectangles),
//! `resample` (the bilinear filter, resize, evaluation geometry), `colour` (colour operations,
//! lighting, affine maps, normalisation), `erasing` (random erasing), `auto_augment`
//! (RandAugment / TrivialAugmentWide and their operations) and `pipeline` ([`Transform`]);
//! everything public is re-exported here.

mod auto_augment;
mod colour;
mod erasing;
mod geometry;
mod pipeline;
mod resample;

pub use auto_augment::{
    affine_nearest, auto_augment, autocontrast, draw_auto_augment, enhance_brightness,
    enhance_color, enhance_contrast, enhance_sharpness, equalize, inverse_affine_matrix, posterize,
    rotate, shear_x, shear_y, solarize, translate, AugmentOp, MagnitudeSpace,
};
pub use colour::{
    add_lighting, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
    apply_color_ops, color_affine, draw_color_ops, draw_lighting_alpha, hue_matrix,
    lighting_offset, normalize_into, Affine, ColorOp, GREY, PCA_EIGVAL, PCA_EIGVEC,
};
pub use erasing::Erasing;
pub use geometry::{
    alternating_flip, crop, hflip, hflip_in_place, pad_crop, pad_index, random_pad_crop,
    random_resized_crop_rect, Flip, Rect,
};
pub use pipeline::Transform;
pub use resample::{
    center_crop, eval_geometry, eval_resize_crop, resize, resize_shorter, resized_crop,
    resized_crop_f32,
};

use super::Image;

/// An RGB image as f32, row-major HWC, on the 0–1 scale.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<f32>,
}

impl FloatImage {
    /// `img` / 255.
    pub fn from_image(img: &Image) -> FloatImage {
        FloatImage {
            width: img.width,
            height: img.height,
            data: img.rgb.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    /// Rounded and clamped to u8.
    pub fn to_image(&self) -> Image {
        Image {
            width: self.width,
            height: self.height,
            rgb: self
                .data
                .iter()
                .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect(),
        }
    }

    pub fn pixel(&self, x: u32, y: u32) -> [f32; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Mean colour.
    pub fn mean(&self) -> [f32; 3] {
        mean_rgb(&self.data, 1.0)
    }
}

/// Mean colour of an HWC buffer, times `scale`. Sums 24 interleaved lanes in f32 (vectorisable)
/// over blocks of 1024 pixels, and the blocks in f64.
fn mean_rgb(hwc: &[f32], scale: f32) -> [f32; 3] {
    let mut s = [0f64; 3];
    for block in hwc.chunks(3 * 1024) {
        let mut acc = [0f32; 24];
        let mut it = block.chunks_exact(24);
        for c in &mut it {
            for k in 0..24 {
                acc[k] += c[k];
            }
        }
        for (k, v) in it.remainder().iter().enumerate() {
            acc[k] += v;
        }
        for (k, v) in acc.iter().enumerate() {
            s[k % 3] += *v as f64;
        }
    }
    let n = (hwc.len() / 3).max(1) as f64;
    [
        (s[0] / n) as f32 * scale,
        (s[1] / n) as f32 * scale,
        (s[2] / n) as f32 * scale,
    ]
}

/// Test images and float comparison shared by the unit tests of the submodules.
#[cfg(test)]
mod test_support {
    use crate::data::Image;

    pub fn ramp(w: u32, h: u32) -> Image {
        let mut rgb = Vec::new();
        for y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(&[(x * 10 + 1) as u8, (y * 10 + 2) as u8, (x + y) as u8]);
            }
        }
        Image::from_rgb(w, h, rgb)
    }

    pub fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }
}
