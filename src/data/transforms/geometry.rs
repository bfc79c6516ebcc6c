//! Geometry on u8 images: padding and cropping, flips, and the random-resized-crop rectangle.

use crate::config::PadMode;
use crate::data::{stream_rng, Image, TAG_FLIP};
use rand::Rng;

/// A rectangle of an image: top-left corner and size, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Index `i` of a line of `n` values extended by mirroring at both ends without repeating the
/// edge (PyTorch's `reflect` padding): -1 → 1, n → n − 2. `None` outside the line for zero
/// padding.
pub fn pad_index(i: i64, n: i64, mode: PadMode) -> Option<i64> {
    if (0..n).contains(&i) {
        return Some(i);
    }
    match mode {
        PadMode::Zeros => None,
        PadMode::Reflect if n == 1 => Some(0),
        PadMode::Reflect => {
            let period = 2 * (n - 1);
            let k = i.rem_euclid(period);
            Some(if k < n { k } else { period - k })
        }
    }
}

/// The `size` x `size` crop at (`x`, `y`) of `img` padded by `pad` on every side (`x`, `y` in
/// padded coordinates: 0..=2·pad for a 32-px image and a 32-px crop), mirrored when `flip`.
pub fn pad_crop(
    img: &Image,
    pad: u32,
    mode: PadMode,
    size: u32,
    x: u32,
    y: u32,
    flip: bool,
) -> Image {
    let (w, h) = (img.width as i64, img.height as i64);
    let s = size as usize;
    let mut out = vec![0u8; s * s * 3];
    for i in 0..s {
        let Some(sy) = pad_index(y as i64 + i as i64 - pad as i64, h, mode) else {
            continue;
        };
        let src_row = &img.rgb[(sy * w * 3) as usize..((sy + 1) * w * 3) as usize];
        let dst_row = &mut out[i * s * 3..(i + 1) * s * 3];
        for j in 0..s {
            let Some(sx) = pad_index(x as i64 + j as i64 - pad as i64, w, mode) else {
                continue;
            };
            let d = if flip { s - 1 - j } else { j };
            let sp = sx as usize * 3;
            dst_row[d * 3..d * 3 + 3].copy_from_slice(&src_row[sp..sp + 3]);
        }
    }
    Image {
        width: size,
        height: size,
        rgb: out,
    }
}

/// Whether a training sample is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    Never,
    /// With probability 0.5, drawn from the sample's random stream.
    Random,
    /// Decided beforehand (`data.alternate_flip`, see [`alternating_flip`]); nothing is drawn.
    Fixed(bool),
}

impl Flip {
    /// How sample `index` of `epoch` is flipped under `data.flip` (`flip`) and
    /// `data.alternate_flip` (`alternate`).
    pub fn for_sample(flip: bool, alternate: bool, seed: u64, index: usize, epoch: usize) -> Flip {
        match (flip, alternate) {
            (false, _) => Flip::Never,
            (true, false) => Flip::Random,
            (true, true) => Flip::Fixed(alternating_flip(seed, index, epoch)),
        }
    }

    /// Whether to mirror; draws from `rng` only for `Flip::Random`.
    pub fn draw(self, rng: &mut impl Rng) -> bool {
        match self {
            Flip::Never => false,
            Flip::Random => rng.gen_bool(0.5),
            Flip::Fixed(f) => f,
        }
    }
}

/// Alternating flip (airbench): image `index` is mirrored in epoch 1 (epochs count from 1) by a
/// draw of its own that stays the same all run, then the other way each epoch after.
pub fn alternating_flip(seed: u64, index: usize, epoch: usize) -> bool {
    let first = stream_rng(seed, 0, index as u64, TAG_FLIP).gen_bool(0.5);
    first ^ epoch.is_multiple_of(2)
}

/// The CIFAR training crop: pad by `pad` (zeros or reflection), a uniformly random `size` crop,
/// then the flip. Draws x, then y, then (for `Flip::Random`) the flip.
pub fn random_pad_crop(
    img: &Image,
    pad: u32,
    mode: PadMode,
    size: u32,
    flip: Flip,
    rng: &mut impl Rng,
) -> Image {
    let range = |side: u32| -> (u32, u32) {
        let padded = side + 2 * pad;
        if padded >= size {
            (padded - size, 0)
        } else {
            // Smaller than the crop even after padding: centre it (extra zero fill).
            (0, (size - padded) / 2)
        }
    };
    let (rx, ex) = range(img.width);
    let (ry, ey) = range(img.height);
    let x = rng.gen_range(0..=rx);
    let y = rng.gen_range(0..=ry);
    let f = flip.draw(rng);
    if ex == 0 && ey == 0 {
        pad_crop(img, pad, mode, size, x, y, f)
    } else {
        // Pad more so that the crop fits.
        let extra = ex.max(ey);
        pad_crop(
            img,
            pad + extra,
            mode,
            size,
            x + extra - ex,
            y + extra - ey,
            f,
        )
    }
}

/// Mirror image (left ↔ right).
pub fn hflip(img: &Image) -> Image {
    let mut out = img.clone();
    hflip_in_place(&mut out);
    out
}

pub fn hflip_in_place(img: &mut Image) {
    let w = img.width as usize;
    if w == 0 {
        return;
    }
    for row in img.rgb.chunks_exact_mut(w * 3) {
        for j in 0..w / 2 {
            let k = w - 1 - j;
            for c in 0..3 {
                row.swap(j * 3 + c, k * 3 + c);
            }
        }
    }
}

/// A copy of `rect` of `img`.
pub fn crop(img: &Image, rect: Rect) -> Image {
    assert!(
        rect.x + rect.width <= img.width && rect.y + rect.height <= img.height,
        "crop outside the image"
    );
    let mut rgb = Vec::with_capacity(rect.width as usize * rect.height as usize * 3);
    for y in rect.y..rect.y + rect.height {
        let start = (y as usize * img.width as usize + rect.x as usize) * 3;
        rgb.extend_from_slice(&img.rgb[start..start + rect.width as usize * 3]);
    }
    Image {
        width: rect.width,
        height: rect.height,
        rgb,
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area fraction drawn from
/// U[area] and an aspect ratio log-uniform in `aspect`; the first crop that fits is placed uniformly
/// at random; after 10 misses, a centre crop with the aspect ratio clamped into `aspect`.
pub fn random_resized_crop_rect(
    width: u32,
    height: u32,
    area: [f64; 2],
    aspect: [f64; 2],
    rng: &mut impl Rng,
) -> Rect {
    let (w0, h0) = (width as f64, height as f64);
    let total = w0 * h0;
    let (la, lb) = (aspect[0].ln(), aspect[1].ln());
    for _ in 0..10 {
        let target = total * uniform(rng, area[0], area[1]);
        let ratio = uniform(rng, la, lb).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w > 0.0 && w <= w0 && h > 0.0 && h <= h0 {
            let (w, h) = (w as u32, h as u32);
            let y = rng.gen_range(0..=height - h);
            let x = rng.gen_range(0..=width - w);
            return Rect {
                x,
                y,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = w0 / h0;
    let (w, h) = if in_ratio < aspect[0] {
        (width, ((w0 / aspect[0]).round() as u32).clamp(1, height))
    } else if in_ratio > aspect[1] {
        (((h0 * aspect[1]).round() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    Rect {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// U[lo, hi) that also accepts lo == hi.
pub(super) fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transforms::test_support::ramp;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn pad_crop_known_offset() {
        let img = ramp(4, 3);
        // Offset (0, 0) with pad 2: the top-left 2x2 of the output is zero padding.
        let c = pad_crop(&img, 2, PadMode::Zeros, 4, 0, 0, false);
        assert_eq!((c.width, c.height), (4, 4));
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        assert_eq!(c.pixel(1, 3), [0, 0, 0]);
        assert_eq!(c.pixel(2, 2), img.pixel(0, 0));
        assert_eq!(c.pixel(3, 3), img.pixel(1, 1));
        // Offset (pad, pad) = the unpadded top-left crop.
        let c = pad_crop(&img, 2, PadMode::Zeros, 3, 2, 2, false);
        for y in 0..3 {
            for x in 0..3 {
                assert_eq!(c.pixel(x, y), img.pixel(x, y));
            }
        }
        // Offset (3, 1): output (x, y) = source (x + 1, y − 1).
        let c = pad_crop(&img, 2, PadMode::Zeros, 3, 3, 1, false);
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        assert_eq!(c.pixel(0, 1), img.pixel(1, 0));
        assert_eq!(c.pixel(2, 2), img.pixel(3, 1));
        assert_eq!(c.pixel(2, 1), img.pixel(3, 0));
        // Flip = mirror of the same crop.
        let f = pad_crop(&img, 2, PadMode::Zeros, 3, 3, 1, true);
        assert_eq!(f.rgb, hflip(&c).rgb);
    }

    #[test]
    fn random_pad_crop_stays_in_range_and_covers_offsets() {
        let img = ramp(8, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let c = random_pad_crop(&img, 2, PadMode::Zeros, 8, Flip::Never, &mut rng);
            assert_eq!((c.width, c.height), (8, 8));
            // Recover the offset from where source pixel (0, 0) landed.
            let pos = (0..8)
                .flat_map(|y| (0..8).map(move |x| (x, y)))
                .find(|&(x, y)| c.pixel(x, y) == img.pixel(0, 0));
            if let Some(p) = pos {
                seen.insert(p);
            }
        }
        assert_eq!(
            seen.len(),
            9,
            "offsets 0..=4 in x and y with source (0, 0) visible for x, y <= 2"
        );
    }

    #[test]
    fn reflect_padding_mirrors_without_repeating_the_edge() {
        let r = |i| pad_index(i, 4, PadMode::Reflect).unwrap();
        // PyTorch's reflect: [a b c d] → c b | a b c d | c b.
        assert_eq!((r(-2), r(-1), r(0), r(3), r(4), r(5)), (2, 1, 0, 3, 2, 1));
        assert_eq!(r(-7), 1); // beyond one reflection: periodic
        assert_eq!(pad_index(-1, 4, PadMode::Zeros), None);
        let img = ramp(4, 3);
        // Crop at padded (0, 0) with pad 2: output (0, 0) is source (2, 2), (2, 2) is (0, 0).
        let c = pad_crop(&img, 2, PadMode::Reflect, 4, 0, 0, false);
        assert_eq!(c.pixel(0, 0), img.pixel(2, 2));
        assert_eq!(c.pixel(1, 2), img.pixel(1, 0));
        assert_eq!(c.pixel(2, 2), img.pixel(0, 0));
        assert_eq!(c.pixel(3, 3), img.pixel(1, 1));
    }

    #[test]
    fn alternating_flip_mirrors_each_image_the_other_way_every_epoch() {
        let first: Vec<bool> = (0..400).map(|i| alternating_flip(9, i, 1)).collect();
        let flipped = first.iter().filter(|&&f| f).count();
        assert!((150..250).contains(&flipped), "{flipped} of 400 in epoch 1");
        for epoch in 2..6 {
            for (i, &f) in first.iter().enumerate() {
                assert_eq!(alternating_flip(9, i, epoch), f ^ (epoch % 2 == 0));
            }
        }
        // Another seed, another first epoch.
        assert!((0..400).any(|i| alternating_flip(10, i, 1) != first[i]));
        // A fixed flip draws nothing: the crop offsets are the random ones' (x, y drawn first).
        let img = ramp(8, 8);
        let mut a = ChaCha8Rng::seed_from_u64(5);
        let mut b = ChaCha8Rng::seed_from_u64(5);
        let fixed = random_pad_crop(&img, 2, PadMode::Zeros, 8, Flip::Fixed(true), &mut a);
        let never = random_pad_crop(&img, 2, PadMode::Zeros, 8, Flip::Never, &mut b);
        assert_eq!(fixed.rgb, hflip(&never).rgb);
    }

    #[test]
    fn flip_mirrors() {
        let img = ramp(3, 2);
        let f = hflip(&img);
        assert_eq!(f.pixel(0, 1), img.pixel(2, 1));
        assert_eq!(f.pixel(1, 0), img.pixel(1, 0));
        assert_eq!(hflip(&f).rgb, img.rgb);
    }

    #[test]
    fn rrc_rect_within_bounds_and_area() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let r = random_resized_crop_rect(200, 100, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(
                r.width > 0 && r.height > 0 && r.x + r.width <= 200 && r.y + r.height <= 100,
                "{r:?}"
            );
        }
    }

    #[test]
    fn rrc_fallback_cases() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // Area 1 with aspect exactly 3 on a 2:1 image never fits → in_ratio 2 < 3: w = 200, h = round(200/3).
        let r = random_resized_crop_rect(200, 100, [1.0, 1.0], [3.0, 3.0], &mut rng);
        assert_eq!(
            r,
            Rect {
                x: 0,
                y: 16,
                width: 200,
                height: 67
            }
        );
        // in_ratio 2 > 1.5: h = 100, w = 150, centred.
        let r = random_resized_crop_rect(200, 100, [1.0, 1.0], [1.5, 1.5], &mut rng);
        assert_eq!(
            r,
            Rect {
                x: 25,
                y: 0,
                width: 150,
                height: 100
            }
        );
        // Whole image when the aspect range contains it and area 1 fits exactly.
        let r = random_resized_crop_rect(100, 100, [1.0, 1.0], [1.0, 1.0], &mut rng);
        assert_eq!(
            r,
            Rect {
                x: 0,
                y: 0,
                width: 100,
                height: 100
            }
        );
    }
}
