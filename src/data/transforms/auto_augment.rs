//! Automatic augmentation (`data.auto_augment`): RandAugment (Cubuk et al. 2020) and
//! TrivialAugmentWide (Müller & Hutter 2021) with torchvision's 14 operations and magnitude ranges
//! (`torchvision.transforms.v2.RandAugment(num_ops, magnitude, num_magnitude_bins = 31)` and
//! `TrivialAugmentWide(num_magnitude_bins = 31)`: nearest interpolation, fill 0), plus timm's
//! magnitude noise (`mstd`) for RandAugment.
//!
//! Each operation is a pure function on a u8 [`Image`] that reproduces torchvision's uint8 tensor
//! kernel (`torchvision.transforms.v2.functional`) step by step in the same f32 arithmetic:
//!
//! * the geometric ones ([`shear_x`], [`shear_y`], [`translate`], [`rotate`]) build torchvision's
//!   inverse affine matrix in f64 ([`inverse_affine_matrix`]), then sample as `F.affine` on a
//!   tensor does ([`affine_nearest`]): output pixel centres relative to the image centre, the
//!   matrix in f32 divided by half the size, `grid_sample`'s unnormalisation
//!   `(g + 1)·size/2 − 0.5`, rounding half to even, 0 outside;
//! * the blends ([`enhance_color`], [`enhance_contrast`], [`enhance_sharpness`]) compute
//!   `image·ratio + other·(1 − ratio)` with the second product fused, clamp, and truncate when
//!   casting back to u8, as v2's `_blend` does (ATen's `add_(…, alpha)` is a fused multiply-add
//!   in its AVX2 / AVX-512 vector loop); the grey level is `floor(0.2989 R + 0.587 G + 0.114 B)`
//!   (fused likewise); [`enhance_brightness`] is `v·factor` truncated;
//! * [`posterize`], [`solarize`], [`autocontrast`] (per channel, f32 division, truncated) and
//!   [`equalize`] (PIL's lookup table, per channel) are integer or single-rounding arithmetic.
//!
//! Against torchvision 0.26 on uint8 tensors (`tests/auto_augment.rs`, 2,230 cases: 5 images,
//! both policies' ranges, 11 bins, both signs): identity, translations, brightness, posterize,
//! solarize, autocontrast and equalize are exact; shears and rotations are exact on the machine
//! checked (the test allows 0.1 % of pixels, whose f32 source coordinate lies within rounding of a
//! half pixel, for a torch whose matrix product rounds otherwise). The blends differ by at most
//! 1 grey level on at most 0.1 % of the values: torch does not fuse the multiply-add in the
//! scalar loop that ends each contiguous run of its kernels (the last < 16 values with AVX2, < 32
//! with AVX-512), and a value there within one rounding of a whole level truncates to the other
//! side (1 value in 813,912 in the test). On a torch without fused kernels at all, up to 5 %.
//! The magnitude tables are torch's f32 `linspace` as its scalar loop computes it; its AVX2
//! vector loop gives some bins 1 ulp apart (which can move a solarize threshold that is a whole
//! grey level by one level), so the tables are compared to within 1 f32 ulp.
//!
//! The draws ([`draw_auto_augment`]) follow torchvision's order: per operation its index, then
//! (RandAugment with `mstd`) the bin N(m, mstd) clipped to [0, 30] as timm does, (TrivialAugment)
//! the bin, only for an operation with a magnitude, then the sign, only for a signed one. A
//! non-integer bin interpolates the ranges linearly (posterize's bits are rounded, translations
//! truncated, as torchvision does with its tables).

use crate::config::{AutoAugmentPolicy, AUTO_AUGMENT_BINS};
use crate::data::Image;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// The operations of both policies, in torchvision's order (a draw picks an index into
/// [`AugmentOp::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugmentOp {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

/// Which magnitude ranges: RandAugment's or TrivialAugmentWide's (wider).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagnitudeSpace {
    Rand,
    Wide,
}

impl AugmentOp {
    pub const ALL: [AugmentOp; 14] = [
        AugmentOp::Identity,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateX,
        AugmentOp::TranslateY,
        AugmentOp::Rotate,
        AugmentOp::Brightness,
        AugmentOp::Color,
        AugmentOp::Contrast,
        AugmentOp::Sharpness,
        AugmentOp::Posterize,
        AugmentOp::Solarize,
        AugmentOp::AutoContrast,
        AugmentOp::Equalize,
    ];

    /// torchvision's name of the operation (its `_AUGMENTATION_SPACE` key).
    pub fn name(self) -> &'static str {
        match self {
            AugmentOp::Identity => "Identity",
            AugmentOp::ShearX => "ShearX",
            AugmentOp::ShearY => "ShearY",
            AugmentOp::TranslateX => "TranslateX",
            AugmentOp::TranslateY => "TranslateY",
            AugmentOp::Rotate => "Rotate",
            AugmentOp::Brightness => "Brightness",
            AugmentOp::Color => "Color",
            AugmentOp::Contrast => "Contrast",
            AugmentOp::Sharpness => "Sharpness",
            AugmentOp::Posterize => "Posterize",
            AugmentOp::Solarize => "Solarize",
            AugmentOp::AutoContrast => "AutoContrast",
            AugmentOp::Equalize => "Equalize",
        }
    }

    /// Whether the operation has a magnitude (all but identity, autocontrast and equalize).
    pub fn has_magnitude(self) -> bool {
        !matches!(
            self,
            AugmentOp::Identity | AugmentOp::AutoContrast | AugmentOp::Equalize
        )
    }

    /// Whether the magnitude is negated with probability ½.
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            AugmentOp::ShearX
                | AugmentOp::ShearY
                | AugmentOp::TranslateX
                | AugmentOp::TranslateY
                | AugmentOp::Rotate
                | AugmentOp::Brightness
                | AugmentOp::Color
                | AugmentOp::Contrast
                | AugmentOp::Sharpness
        )
    }

    /// The (unsigned) magnitude at bin `level` (0 to 30, fractional allowed) of `space` for a
    /// `width`×`height` image, as torchvision's table holds it (f32, widened); `None` for the
    /// operations without one.
    pub fn magnitude(
        self,
        space: MagnitudeSpace,
        level: f64,
        width: u32,
        height: u32,
    ) -> Option<f64> {
        let wide = space == MagnitudeSpace::Wide;
        let ramp = |hi: f64| Some(linspace_at(0.0, hi, level));
        match self {
            AugmentOp::Identity | AugmentOp::AutoContrast | AugmentOp::Equalize => None,
            AugmentOp::ShearX | AugmentOp::ShearY => ramp(if wide { 0.99 } else { 0.3 }),
            AugmentOp::TranslateX | AugmentOp::TranslateY => {
                let side = if self == AugmentOp::TranslateX {
                    width
                } else {
                    height
                };
                ramp(if wide {
                    32.0
                } else {
                    150.0 / 331.0 * side as f64
                })
            }
            AugmentOp::Rotate => ramp(if wide { 135.0 } else { 30.0 }),
            AugmentOp::Brightness
            | AugmentOp::Color
            | AugmentOp::Contrast
            | AugmentOp::Sharpness => ramp(if wide { 0.99 } else { 0.9 }),
            AugmentOp::Posterize => {
                // `(8 - arange(bins) / ((bins - 1) / k)).round().int()`, in f32: 8 down to 4
                // bits (RandAugment, k = 4) or to 2 (wide, k = 6).
                let k = if wide { 6.0 } else { 4.0 };
                let per_bit = ((AUTO_AUGMENT_BINS - 1) as f64 / k) as f32;
                Some((8.0 - level as f32 / per_bit).round_ties_even() as f64)
            }
            AugmentOp::Solarize => Some(linspace_at(1.0, 0.0, level)),
        }
    }

    /// Applies the operation with the signed `magnitude` as torchvision's
    /// `_apply_image_or_video_transform` does.
    pub fn apply(self, img: &Image, magnitude: f64) -> Image {
        match self {
            AugmentOp::Identity => img.clone(),
            AugmentOp::ShearX => shear_x(img, magnitude),
            AugmentOp::ShearY => shear_y(img, magnitude),
            // `int(magnitude)`: truncated towards zero.
            AugmentOp::TranslateX => translate(img, magnitude.trunc() as i64, 0),
            AugmentOp::TranslateY => translate(img, 0, magnitude.trunc() as i64),
            AugmentOp::Rotate => rotate(img, magnitude),
            AugmentOp::Brightness => enhance_brightness(img, 1.0 + magnitude),
            AugmentOp::Color => enhance_color(img, 1.0 + magnitude),
            AugmentOp::Contrast => enhance_contrast(img, 1.0 + magnitude),
            AugmentOp::Sharpness => enhance_sharpness(img, 1.0 + magnitude),
            AugmentOp::Posterize => posterize(img, magnitude as u32),
            AugmentOp::Solarize => solarize(img, 255.0 * magnitude),
            AugmentOp::AutoContrast => autocontrast(img),
            AugmentOp::Equalize => equalize(img),
        }
    }
}

/// `torch.linspace(lo, hi, 31)[level]` in f32 as torch's scalar loop computes it (from the start
/// below the halfway index, from the end above it), for a fractional `level` too.
fn linspace_at(lo: f64, hi: f64, level: f64) -> f64 {
    let (lo, hi, level) = (lo as f32, hi as f32, level as f32);
    let last = (AUTO_AUGMENT_BINS - 1) as f32;
    let step = (hi - lo) / last;
    let halfway = (AUTO_AUGMENT_BINS / 2) as f32;
    let v = if level < halfway {
        lo + step * level
    } else {
        hi - step * (last - level)
    };
    v as f64
}

/// The operations and signed magnitudes `policy` draws for one `width`×`height` image.
pub fn draw_auto_augment(
    policy: &AutoAugmentPolicy,
    width: u32,
    height: u32,
    rng: &mut impl Rng,
) -> Vec<(AugmentOp, f64)> {
    let signed =
        |op: AugmentOp, magnitude: Option<f64>, rng: &mut dyn rand::RngCore| match magnitude {
            None => 0.0,
            Some(m) if op.is_signed() && rng.gen_bool(0.5) => -m,
            Some(m) => m,
        };
    let pick = |rng: &mut dyn rand::RngCore| AugmentOp::ALL[rng.gen_range(0..AugmentOp::ALL.len())];
    let top = (AUTO_AUGMENT_BINS - 1) as f64;
    match *policy {
        AutoAugmentPolicy::Rand {
            num_ops,
            magnitude,
            magnitude_std,
        } => {
            let noise = (magnitude_std > 0.0).then(|| {
                Normal::new(magnitude as f64, magnitude_std).expect("validated: finite std >= 0")
            });
            (0..num_ops)
                .map(|_| {
                    let op = pick(&mut *rng);
                    // timm draws the noisy magnitude for every operation, with or without one.
                    let level = match &noise {
                        Some(n) => n.sample(&mut *rng).clamp(0.0, top),
                        None => magnitude as f64,
                    };
                    let m = op.magnitude(MagnitudeSpace::Rand, level, width, height);
                    (op, signed(op, m, &mut *rng))
                })
                .collect()
        }
        AutoAugmentPolicy::TrivialWide => {
            let op = pick(&mut *rng);
            // torchvision draws the bin only for an operation with a magnitude.
            let m = op.has_magnitude().then(|| {
                let level = rng.gen_range(0..AUTO_AUGMENT_BINS) as f64;
                op.magnitude(MagnitudeSpace::Wide, level, width, height)
                    .expect("the operation has a magnitude")
            });
            vec![(op, signed(op, m, &mut *rng))]
        }
    }
}

/// `img` augmented by `policy`, with the draws of [`draw_auto_augment`].
pub fn auto_augment(img: &Image, policy: &AutoAugmentPolicy, rng: &mut impl Rng) -> Image {
    let ops = draw_auto_augment(policy, img.width, img.height, rng);
    let mut out = img.clone();
    for (op, magnitude) in ops {
        out = op.apply(&out, magnitude);
    }
    out
}

/// torchvision's `_get_inverse_affine_matrix` at scale 1: the map from an output position to the
/// input position (both relative to the image centre, `center` shifting the pivot) of the
/// rotation by `angle` degrees (anticlockwise in image coordinates is negative here, as in
/// `F.affine`), shears `shear` in degrees and translation `translate`; row-major 2x3.
pub fn inverse_affine_matrix(
    center: [f64; 2],
    angle: f64,
    translate: [f64; 2],
    shear: [f64; 2],
) -> [f64; 6] {
    // Operation for operation as torchvision writes it (f64), so the f32 matrix is the same.
    let rot = angle.to_radians();
    let sx = shear[0].to_radians();
    let sy = shear[1].to_radians();
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let cos_sy = sy.cos();
    let tan_sx = sx.tan();
    let rot_minus_sy = rot - sy;
    let cx_plus_tx = cx + tx;
    let cy_plus_ty = cy + ty;
    let a = rot_minus_sy.cos() / cos_sy;
    let b = -(a * tan_sx + rot.sin());
    let c = rot_minus_sy.sin() / cos_sy;
    let d = rot.cos() - c * tan_sx;
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += cx - m[0] * cx_plus_tx - m[1] * cy_plus_ty;
    m[5] += cy - m[3] * cx_plus_tx - m[4] * cy_plus_ty;
    m
}

/// `img` resampled through the inverse affine `matrix` (output position → input position,
/// relative to the image centre) with nearest interpolation and 0 outside, as torchvision's
/// `F.affine` / `F.rotate` on a uint8 tensor: `_affine_grid` then `grid_sample(mode = "nearest",
/// align_corners = False)`, in its f32 arithmetic.
pub fn affine_nearest(img: &Image, matrix: [f64; 6]) -> Image {
    let (w, h) = (img.width as usize, img.height as usize);
    let theta = matrix.map(|v| v as f32);
    // `theta / [w/2, h/2]`: the grid in grid_sample's normalised coordinates.
    let (half_w, half_h) = ((0.5 * w as f64) as f32, (0.5 * h as f64) as f32);
    let gx = [theta[0] / half_w, theta[1] / half_w, theta[2] / half_w];
    let gy = [theta[3] / half_h, theta[4] / half_h, theta[5] / half_h];
    // grid_sample's `scaling_factor` (size / 2) for align_corners = False.
    let (scale_w, scale_h) = (w as f32 / 2.0, h as f32 / 2.0);
    let mut out = vec![0u8; w * h * 3];
    for row in 0..h {
        // The base grid: pixel centres relative to the image centre.
        let y = row as f32 - (h as f32 - 1.0) * 0.5;
        for col in 0..w {
            let x = col as f32 - (w as f32 - 1.0) * 0.5;
            let u = x * gx[0] + y * gx[1] + gx[2];
            let v = x * gy[0] + y * gy[1] + gy[2];
            let sx = ((u + 1.0) * scale_w - 0.5).round_ties_even();
            let sy = ((v + 1.0) * scale_h - 0.5).round_ties_even();
            if sx >= 0.0 && sx < w as f32 && sy >= 0.0 && sy < h as f32 {
                let s = (sy as usize * w + sx as usize) * 3;
                let d = (row * w + col) * 3;
                out[d..d + 3].copy_from_slice(&img.rgb[s..s + 3]);
            }
        }
    }
    Image::from_rgb(img.width, img.height, out)
}

/// RandAugment's `ShearX` by `factor` (x += factor · (y + ½) about the top edge: torchvision's
/// shear of `atan(factor)` degrees with centre (0, 0)).
pub fn shear_x(img: &Image, factor: f64) -> Image {
    let degrees = factor.atan().to_degrees();
    affine_nearest(img, shear_matrix(img, [degrees, 0.0]))
}

/// RandAugment's `ShearY` by `factor` (about the left edge).
pub fn shear_y(img: &Image, factor: f64) -> Image {
    let degrees = factor.atan().to_degrees();
    affine_nearest(img, shear_matrix(img, [0.0, degrees]))
}

fn shear_matrix(img: &Image, shear: [f64; 2]) -> [f64; 6] {
    // `center = [0, 0]` in pixels is (−w/2, −h/2) relative to the centre.
    let center = [-(img.width as f64) * 0.5, -(img.height as f64) * 0.5];
    inverse_affine_matrix(center, 0.0, [0.0, 0.0], shear)
}

/// `img` moved by `dx` pixels right and `dy` down, 0 where nothing comes in.
pub fn translate(img: &Image, dx: i64, dy: i64) -> Image {
    let m = inverse_affine_matrix([0.0, 0.0], 0.0, [dx as f64, dy as f64], [0.0, 0.0]);
    affine_nearest(img, m)
}

/// `img` rotated anticlockwise by `degrees` about its centre, same size, 0 in the corners: as
/// torchvision's `F.rotate`, which mirrors 0°, 180° and (square images) 90° / 270° by index
/// instead of sampling.
pub fn rotate(img: &Image, degrees: f64) -> Image {
    // Python's `angle % 360`.
    let angle = degrees.rem_euclid(360.0);
    let (w, h) = (img.width as usize, img.height as usize);
    let turn = |map: &dyn Fn(usize, usize) -> (usize, usize)| {
        let mut out = vec![0u8; w * h * 3];
        for row in 0..h {
            for col in 0..w {
                let (sr, sc) = map(row, col);
                let (d, s) = ((row * w + col) * 3, (sr * w + sc) * 3);
                out[d..d + 3].copy_from_slice(&img.rgb[s..s + 3]);
            }
        }
        Image::from_rgb(img.width, img.height, out)
    };
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return turn(&|r, c| (h - 1 - r, w - 1 - c));
    }
    if w == h && angle == 90.0 {
        // torch.rot90(k = 1): out[r][c] = in[c][w − 1 − r].
        return turn(&|r, c| (c, w - 1 - r));
    }
    if w == h && angle == 270.0 {
        return turn(&|r, c| (h - 1 - c, r));
    }
    // F.rotate's angle is the opposite of F.affine's.
    affine_nearest(
        img,
        inverse_affine_matrix([0.0, 0.0], -angle, [0.0, 0.0], [0.0, 0.0]),
    )
}

/// v2's `_blend` of one u8 value with `other`: `v·ratio + other·(1 − ratio)` in f32 with the
/// second product fused, clamped to [0, 255], truncated.
fn blend(v: u8, other: f32, ratio: f32, other_ratio: f32) -> u8 {
    other
        .mul_add(other_ratio, v as f32 * ratio)
        .clamp(0.0, 255.0) as u8
}

/// The grey level torchvision blends colour and contrast with: `floor(0.2989 R + 0.587 G +
/// 0.114 B)` in f32 (fused multiply-adds).
fn grey(p: &[u8]) -> f32 {
    let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
    b.mul_add(0.114, g.mul_add(0.587, r * 0.2989)).floor()
}

/// Every value times `factor`, clamped, truncated (`F.adjust_brightness`).
pub fn enhance_brightness(img: &Image, factor: f64) -> Image {
    let f = factor as f32;
    let rgb = img
        .rgb
        .iter()
        .map(|&v| (v as f32 * f).clamp(0.0, 255.0) as u8)
        .collect();
    Image::from_rgb(img.width, img.height, rgb)
}

/// Each pixel blended with its grey level by `factor` (`F.adjust_saturation`, the "Color" op).
pub fn enhance_color(img: &Image, factor: f64) -> Image {
    let (ratio, other) = (factor as f32, (1.0 - factor) as f32);
    let mut rgb = Vec::with_capacity(img.rgb.len());
    for p in img.rgb.chunks_exact(3) {
        let g = grey(p);
        rgb.extend(p.iter().map(|&v| blend(v, g, ratio, other)));
    }
    Image::from_rgb(img.width, img.height, rgb)
}

/// Every value blended with the image's mean grey level by `factor` (`F.adjust_contrast`).
pub fn enhance_contrast(img: &Image, factor: f64) -> Image {
    let n = img.rgb.len() / 3;
    // The grey levels are whole numbers, so their sum is exact; torch's f32 sum is too up to
    // 2^24 (every image up to 256 x 256).
    let sum: u64 = img.rgb.chunks_exact(3).map(|p| grey(p) as u64).sum();
    let mean = sum as f32 / n.max(1) as f32;
    let (ratio, other) = (factor as f32, (1.0 - factor) as f32);
    let rgb = img
        .rgb
        .iter()
        .map(|&v| blend(v, mean, ratio, other))
        .collect();
    Image::from_rgb(img.width, img.height, rgb)
}

/// The interior blended with its 3x3 smoothing ([1 1 1; 1 5 1; 1 1 1]/13, rounded) by `factor`,
/// the border pixels kept (`F.adjust_sharpness`, PIL's `ImageEnhance.Sharpness`).
pub fn enhance_sharpness(img: &Image, factor: f64) -> Image {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut out = img.clone();
    if w <= 2 || h <= 2 {
        return out;
    }
    let other = (1.0 - factor) as f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let at = |yy: usize, xx: usize| img.rgb[(yy * w + xx) * 3 + c] as u32;
                let mut sum = 4 * at(y, x);
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        sum += at(yy, xx);
                    }
                }
                // round(sum / 13): never a tie, 13 being odd.
                let smooth = ((2 * sum + 13) / 26) as f32;
                let v = at(y, x) as f32;
                out.rgb[(y * w + x) * 3 + c] =
                    (smooth - v).mul_add(other, v).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Every value keeps its top `bits` bits (`F.posterize`).
pub fn posterize(img: &Image, bits: u32) -> Image {
    if bits >= 8 {
        return img.clone();
    }
    let mask = (((1u32 << bits) - 1) << (8 - bits)) as u8;
    let rgb = img.rgb.iter().map(|&v| v & mask).collect();
    Image::from_rgb(img.width, img.height, rgb)
}

/// Every value at or above `threshold` inverted (`F.solarize`; compared in f32).
pub fn solarize(img: &Image, threshold: f64) -> Image {
    let t = threshold as f32;
    let rgb = img
        .rgb
        .iter()
        .map(|&v| if v as f32 >= t { 255 - v } else { v })
        .collect();
    Image::from_rgb(img.width, img.height, rgb)
}

/// Each channel stretched to [0, 255] (`F.autocontrast`): `(v − min) / ((max − min)/255)` in f32,
/// truncated; a constant channel is kept.
pub fn autocontrast(img: &Image) -> Image {
    let mut out = img.clone();
    for c in 0..3 {
        let channel = img.rgb.iter().skip(c).step_by(3);
        let (lo, hi) = channel.fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if lo >= hi {
            continue;
        }
        let inv_scale = (hi - lo) as f32 * (1.0f64 / 255.0) as f32;
        for v in out.rgb.iter_mut().skip(c).step_by(3) {
            *v = ((*v - lo) as f32 / inv_scale).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Each channel's histogram equalised with PIL's lookup table (`F.equalize`): with `step` =
/// ⌊(pixels outside the channel's top non-empty bin) / 255⌋, value k maps to
/// ⌊(cum(k − 1) + ⌊step/2⌋) / step⌋ clamped to 255 (0 maps to 0); a channel with step 0 is kept.
pub fn equalize(img: &Image) -> Image {
    let mut out = img.clone();
    let n = img.rgb.len() / 3;
    for c in 0..3 {
        let mut hist = [0usize; 256];
        for &v in img.rgb.iter().skip(c).step_by(3) {
            hist[v as usize] += 1;
        }
        let top = hist.iter().rposition(|&k| k > 0).unwrap_or(0);
        let step = (n - hist[top]) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cum = 0usize;
        for k in 1..256 {
            cum += hist[k - 1];
            lut[k] = ((cum + step / 2) / step).min(255) as u8;
        }
        for v in out.rgb.iter_mut().skip(c).step_by(3) {
            *v = lut[*v as usize];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transforms::test_support::ramp;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn translation_and_quarter_turns_move_pixels_by_index() {
        let img = ramp(6, 6);
        let moved = translate(&img, 2, -1);
        for y in 0..6usize {
            for x in 0..6usize {
                let d = (y * 6 + x) * 3;
                let want = match (x.checked_sub(2), y + 1) {
                    (Some(sx), sy) if sy < 6 => &img.rgb[(sy * 6 + sx) * 3..][..3],
                    _ => &[0u8, 0, 0][..],
                };
                assert_eq!(&moved.rgb[d..d + 3], want, "({x}, {y})");
            }
        }
        // Four quarter turns by index and by sampling (a non-square image samples) agree.
        let quarter = rotate(&img, 90.0);
        assert_eq!(rotate(&rotate(&quarter, 90.0), 180.0).rgb, img.rgb);
        let sampled = affine_nearest(
            &img,
            inverse_affine_matrix([0.0, 0.0], -90.0, [0.0, 0.0], [0.0, 0.0]),
        );
        assert_eq!(sampled.rgb, quarter.rgb);
    }

    #[test]
    fn magnitudes_span_torchvisions_ranges() {
        let space = MagnitudeSpace::Rand;
        let m = |op: AugmentOp, level| op.magnitude(space, level, 331, 100).unwrap();
        assert_eq!(m(AugmentOp::Rotate, 30.0), 30.0);
        assert_eq!(m(AugmentOp::Rotate, 0.0), 0.0);
        assert!((m(AugmentOp::TranslateX, 30.0) - 150.0).abs() < 1e-4);
        assert_eq!(m(AugmentOp::Posterize, 0.0), 8.0);
        assert_eq!(m(AugmentOp::Posterize, 30.0), 4.0);
        assert_eq!(m(AugmentOp::Solarize, 0.0), 1.0);
        assert_eq!(m(AugmentOp::Solarize, 30.0), 0.0);
        let wide = |op: AugmentOp, level| op.magnitude(MagnitudeSpace::Wide, level, 8, 8).unwrap();
        assert_eq!(wide(AugmentOp::Posterize, 30.0), 2.0);
        assert_eq!(wide(AugmentOp::Rotate, 30.0), 135.0);
        assert!(AugmentOp::Equalize.magnitude(space, 9.0, 8, 8).is_none());
    }

    #[test]
    fn draws_follow_the_policy() {
        let rand = AutoAugmentPolicy::Rand {
            num_ops: 3,
            magnitude: 9,
            magnitude_std: 0.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen = [false; 14];
        for _ in 0..200 {
            let ops = draw_auto_augment(&rand, 32, 32, &mut rng);
            assert_eq!(ops.len(), 3);
            for (op, m) in ops {
                seen[AugmentOp::ALL.iter().position(|&o| o == op).unwrap()] = true;
                let fixed = op
                    .magnitude(MagnitudeSpace::Rand, 9.0, 32, 32)
                    .unwrap_or(0.0);
                assert_eq!(m.abs(), fixed, "{op:?}");
            }
        }
        assert!(seen.iter().all(|&s| s));
        let ta = AutoAugmentPolicy::TrivialWide;
        let levels: std::collections::HashSet<u64> = (0..400)
            .filter_map(|_| match draw_auto_augment(&ta, 32, 32, &mut rng)[0] {
                (AugmentOp::Rotate, m) => Some((m.abs() / 4.5).round() as u64),
                _ => None,
            })
            .collect();
        assert!(levels.len() > 10, "{levels:?}");
    }
}
