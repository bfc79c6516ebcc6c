//! Resampling: the separable bilinear ("triangle") filter (see the module doc of
//! [`crate::data::transforms`]), resizing, and the evaluation geometry.

use super::geometry::{crop, Rect};
use super::FloatImage;
use crate::data::Image;

/// The filter taps of one output axis: every output sample has the same number `k` of taps
/// (zero-weight taps pad the shorter ones, always inside the allowed source range).
pub(super) struct Axis {
    /// First source index of each output sample.
    starts: Vec<u32>,
    /// `k` weights per output sample, normalised to sum 1.
    weights: Vec<f32>,
    k: usize,
}

impl Axis {
    /// Output sample `i` is centred at source coordinate `origin + (i + 0.5)·scale`; taps are
    /// restricted to source indices in [lo, hi). Reversed when `flip`.
    fn new(out: usize, origin: f64, scale: f64, lo: usize, hi: usize, flip: bool) -> Axis {
        let filterscale = scale.max(1.0);
        let support = filterscale; // triangle filter of radius 1, widened when downscaling
        let kmax = (support.ceil() as usize) * 2 + 1;
        let mut starts = vec![0u32; out];
        let mut lens = vec![0usize; out];
        let mut raw = vec![0f32; out * kmax];
        for i in 0..out {
            let center = origin + (i as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5).floor().max(lo as f64) as usize).min(hi - 1);
            let xmax =
                ((center + support + 0.5).floor().min(hi as f64).max(0.0) as usize).max(xmin + 1);
            let n = xmax - xmin;
            let slot = if flip { out - 1 - i } else { i };
            let w = &mut raw[slot * kmax..slot * kmax + n];
            let mut total = 0f64;
            for (k, wk) in w.iter_mut().enumerate() {
                let x = ((xmin + k) as f64 - center + 0.5) / filterscale;
                let v = (1.0 - x.abs()).max(0.0);
                *wk = v as f32;
                total += v;
            }
            if total > 0.0 {
                w.iter_mut().for_each(|v| *v = (*v as f64 / total) as f32);
            } else {
                // The centre lies outside the allowed range (degenerate sizes): nearest pixel.
                w.fill(0.0);
                let nearest = (center.floor().max(xmin as f64) as usize).min(xmax - 1);
                w[nearest - xmin] = 1.0;
            }
            starts[slot] = xmin as u32;
            lens[slot] = n;
        }
        // Pad every sample to k taps (k <= hi - lo since every sample fits in [lo, hi)).
        let k = lens.iter().copied().max().unwrap_or(1);
        let mut weights = vec![0f32; out * k];
        for i in 0..out {
            let s = starts[i] as usize;
            let s2 = s.min(hi - k);
            let off = s - s2;
            weights[i * k + off..i * k + off + lens[i]]
                .copy_from_slice(&raw[i * kmax..i * kmax + lens[i]]);
            starts[i] = s2 as u32;
        }
        Axis { starts, weights, k }
    }

    /// The source range the taps cover.
    fn range(&self) -> (usize, usize) {
        let lo = self.starts.iter().copied().min().unwrap_or(0) as usize;
        let hi = self.starts.iter().copied().max().unwrap_or(0) as usize + self.k;
        (lo, hi)
    }
}

/// Reusable per-thread buffers of the resampler, so that no image allocates its temporaries.
#[derive(Default)]
pub(super) struct Scratch {
    row: Vec<f32>,
    tmp: Vec<f32>,
    pub(super) hwc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// `v[..n]`, growing `v` if needed (contents unspecified: callers overwrite all of it).
pub(super) fn scratch_slice(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Horizontal pass of one row with `K` taps per output; `src` is the f32 row starting at
/// source column `x0`.
fn hpass<const K: usize>(src: &[f32], x0: usize, xa: &Axis, dst: &mut [f32]) {
    for ((d, &s), w) in dst
        .chunks_exact_mut(3)
        .zip(&xa.starts)
        .zip(xa.weights.chunks_exact(K))
    {
        let s = (s as usize - x0) * 3;
        let px = &src[s..s + 3 * K];
        let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
        for k in 0..K {
            r += w[k] * px[3 * k];
            g += w[k] * px[3 * k + 1];
            b += w[k] * px[3 * k + 2];
        }
        d[0] = r;
        d[1] = g;
        d[2] = b;
    }
}

fn hpass_dyn(src: &[f32], x0: usize, xa: &Axis, dst: &mut [f32]) {
    let k = xa.k;
    for ((d, &s), w) in dst
        .chunks_exact_mut(3)
        .zip(&xa.starts)
        .zip(xa.weights.chunks_exact(k))
    {
        let s = (s as usize - x0) * 3;
        let (mut r, mut g, mut b) = (0f32, 0f32, 0f32);
        for (wk, p) in w.iter().zip(src[s..s + 3 * k].chunks_exact(3)) {
            r += wk * p[0];
            g += wk * p[1];
            b += wk * p[2];
        }
        d[0] = r;
        d[1] = g;
        d[2] = b;
    }
}

/// Separable resampling of `img` into `out` (HWC f32, 0–255 scale, `xa` x `ya` samples).
pub(super) fn resample_into(
    img: &Image,
    xa: &Axis,
    ya: &Axis,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let out_w = xa.starts.len();
    let out_h = ya.starts.len();
    let row_out = out_w * 3;
    assert_eq!(out.len(), out_h * row_out);
    let (ylo, yhi) = ya.range();
    let (xlo, xhi) = xa.range();
    let src_row_len = img.width as usize * 3;
    let row = scratch_slice(&mut scratch.row, (xhi - xlo) * 3);
    let tmp = scratch_slice(&mut scratch.tmp, (yhi - ylo) * row_out);
    // Horizontal pass over the source rows the vertical taps need.
    for (y, dst) in (ylo..yhi).zip(tmp.chunks_exact_mut(row_out)) {
        let src = &img.rgb[y * src_row_len + xlo * 3..y * src_row_len + xhi * 3];
        for (f, &b) in row.iter_mut().zip(src) {
            *f = b as f32;
        }
        match xa.k {
            1 => hpass::<1>(row, xlo, xa, dst),
            2 => hpass::<2>(row, xlo, xa, dst),
            3 => hpass::<3>(row, xlo, xa, dst),
            4 => hpass::<4>(row, xlo, xa, dst),
            5 => hpass::<5>(row, xlo, xa, dst),
            _ => hpass_dyn(row, xlo, xa, dst),
        }
    }
    // Vertical pass.
    for ((dst, &s), w) in out
        .chunks_exact_mut(row_out)
        .zip(&ya.starts)
        .zip(ya.weights.chunks_exact(ya.k))
    {
        let s = s as usize - ylo;
        let first = &tmp[s * row_out..(s + 1) * row_out];
        for (d, &v) in dst.iter_mut().zip(first) {
            *d = w[0] * v;
        }
        for (k, &wk) in w.iter().enumerate().skip(1) {
            let r = &tmp[(s + k) * row_out..(s + k + 1) * row_out];
            for (d, &v) in dst.iter_mut().zip(r) {
                *d += wk * v;
            }
        }
    }
}

/// `rect` of `img` resized to `out_w` x `out_h` (bilinear, see the module doc), mirrored when
/// `flip`, as f32 0–1.
pub fn resized_crop_f32(img: &Image, rect: Rect, out_w: u32, out_h: u32, flip: bool) -> FloatImage {
    let (xa, ya) = crop_axes(rect, out_w, out_h, flip);
    let mut data = vec![0f32; out_w as usize * out_h as usize * 3];
    with_scratch(|sc| resample_into(img, &xa, &ya, &mut data, sc));
    data.iter_mut().for_each(|v| *v /= 255.0);
    FloatImage {
        width: out_w,
        height: out_h,
        data,
    }
}

pub(super) fn crop_axes(rect: Rect, out_w: u32, out_h: u32, flip: bool) -> (Axis, Axis) {
    let xa = Axis::new(
        out_w as usize,
        rect.x as f64,
        rect.width as f64 / out_w as f64,
        rect.x as usize,
        (rect.x + rect.width) as usize,
        flip,
    );
    let ya = Axis::new(
        out_h as usize,
        rect.y as f64,
        rect.height as f64 / out_h as f64,
        rect.y as usize,
        (rect.y + rect.height) as usize,
        false,
    );
    (xa, ya)
}

/// `rect` of `img` resized to `out_w` x `out_h` (bilinear, see the module doc), rounded to u8.
pub fn resized_crop(img: &Image, rect: Rect, out_w: u32, out_h: u32) -> Image {
    resized_crop_f32(img, rect, out_w, out_h, false).to_image()
}

/// `img` resized to `out_w` x `out_h` (bilinear, see the module doc), rounded to u8.
pub fn resize(img: &Image, out_w: u32, out_h: u32) -> Image {
    resized_crop(
        img,
        Rect {
            x: 0,
            y: 0,
            width: img.width,
            height: img.height,
        },
        out_w,
        out_h,
    )
}

/// The evaluation geometry: (resized width, resized height, crop left, crop top) for resizing the
/// shorter side to `round(size / crop_ratio)` (the longer side truncated, as torchvision does) and
/// centre-cropping `size` (offsets rounded down).
pub fn eval_geometry(width: u32, height: u32, size: u32, crop_ratio: f64) -> (u32, u32, u32, u32) {
    let s = ((size as f64 / crop_ratio).round() as u32).max(size);
    let (rw, rh) = if width <= height {
        (
            s,
            ((s as u64 * height as u64) / width.max(1) as u64).max(size as u64) as u32,
        )
    } else {
        (
            ((s as u64 * width as u64) / height.max(1) as u64).max(size as u64) as u32,
            s,
        )
    };
    (rw, rh, (rw - size) / 2, (rh - size) / 2)
}

pub(super) fn eval_axes(img: &Image, size: u32, crop_ratio: f64) -> (Axis, Axis) {
    let (rw, rh, left, top) = eval_geometry(img.width, img.height, size, crop_ratio);
    let sx = img.width as f64 / rw as f64;
    let sy = img.height as f64 / rh as f64;
    let xa = Axis::new(
        size as usize,
        left as f64 * sx,
        sx,
        0,
        img.width as usize,
        false,
    );
    let ya = Axis::new(
        size as usize,
        top as f64 * sy,
        sy,
        0,
        img.height as usize,
        false,
    );
    (xa, ya)
}

/// Shorter side resized to `size`, the longer one scaled in proportion (truncated).
pub fn resize_shorter(img: &Image, size: u32) -> Image {
    let (w, h) = if img.width <= img.height {
        (
            size,
            ((size as u64 * img.height as u64) / img.width as u64) as u32,
        )
    } else {
        (
            ((size as u64 * img.width as u64) / img.height as u64) as u32,
            size,
        )
    };
    resize(img, w, h)
}

/// The centred `size` x `size` crop (offsets rounded down).
pub fn center_crop(img: &Image, size: u32) -> Image {
    crop(
        img,
        Rect {
            x: (img.width - size) / 2,
            y: (img.height - size) / 2,
            width: size,
            height: size,
        },
    )
}

/// The evaluation transform's geometry as a u8 image: resize shorter side, centre crop.
pub fn eval_resize_crop(img: &Image, size: u32, crop_ratio: f64) -> Image {
    let (xa, ya) = eval_axes(img, size, crop_ratio);
    let mut data = vec![0f32; size as usize * size as usize * 3];
    with_scratch(|sc| resample_into(img, &xa, &ya, &mut data, sc));
    Image {
        width: size,
        height: size,
        rgb: data
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transforms::test_support::{close, ramp};

    #[test]
    fn resize_identity_and_upscale_values() {
        let img = ramp(5, 4);
        assert_eq!(resize(&img, 5, 4).rgb, img.rgb);
        // 2x upscale of a 2x1 image [0, 100] (red): half-pixel centres at 0.25, 0.75, 1.25, 1.75
        // → clamp, 25, 75, clamp.
        let two = Image::from_rgb(2, 1, vec![0, 0, 0, 100, 0, 0]);
        let up = resized_crop_f32(
            &two,
            Rect {
                x: 0,
                y: 0,
                width: 2,
                height: 1,
            },
            4,
            1,
            false,
        );
        let red: Vec<f32> = up.data.chunks(3).map(|p| p[0] * 255.0).collect();
        for (a, b) in red.iter().zip([0.0, 25.0, 75.0, 100.0]) {
            assert!(close(*a, b, 1e-3), "{red:?}");
        }
        let flipped = resized_crop_f32(
            &two,
            Rect {
                x: 0,
                y: 0,
                width: 2,
                height: 1,
            },
            4,
            1,
            true,
        );
        let red_f: Vec<f32> = flipped.data.chunks(3).map(|p| p[0] * 255.0).collect();
        assert!(red_f
            .iter()
            .rev()
            .zip(&red)
            .all(|(a, b)| close(*a, *b, 1e-4)));
    }

    #[test]
    fn resize_downscale_is_area_average_for_integer_factor() {
        // 4x4 → 2x2 with the triangle filter widened 2x: each output is a weighted average of a
        // 4-wide window centred between pixels: weights 1/8, 3/8, 3/8, 1/8 (clipped at edges).
        let mut rgb = Vec::new();
        for _y in 0..4 {
            for x in 0..4u8 {
                rgb.extend_from_slice(&[x * 40, 0, 0]);
            }
        }
        let img = Image::from_rgb(4, 4, rgb);
        let d = resized_crop_f32(
            &img,
            Rect {
                x: 0,
                y: 0,
                width: 4,
                height: 4,
            },
            2,
            2,
            false,
        );
        // Output 0: centre 1.0, taps x=0..2 (x=3 is outside support) w = .25,.75,.75,.25 → edge-clipped:
        // x in [0, 2.5) → 0,1,2 with weights (1-|x+.5-1|/2) = .75, .75, .25 → (0*.75+40*.75+80*.25)/1.75.
        let expect0 = (40.0 * 0.75 + 80.0 * 0.25) / 1.75;
        assert!(
            close(d.pixel(0, 0)[0] * 255.0, expect0, 1e-3),
            "{:?}",
            d.pixel(0, 0)
        );
        // Mirror-symmetric: output 1 = 120 − expect0.
        assert!(close(d.pixel(1, 1)[0] * 255.0, 120.0 - expect0, 1e-3));
    }

    #[test]
    fn resized_crop_equals_crop_then_resize() {
        let img = ramp(20, 16);
        let rect = Rect {
            x: 3,
            y: 5,
            width: 9,
            height: 7,
        };
        for (w, h) in [(12, 10), (5, 4), (9, 7)] {
            let a = resized_crop(&img, rect, w, h);
            let b = resize(&crop(&img, rect), w, h);
            assert_eq!(a.rgb, b.rgb);
        }
        assert_eq!(resized_crop(&img, rect, 9, 7).rgb, crop(&img, rect).rgb);
    }

    #[test]
    fn eval_geometry_and_crop() {
        assert_eq!(eval_geometry(500, 375, 224, 0.875), (341, 256, 58, 16));
        assert_eq!(eval_geometry(160, 213, 224, 0.875), (256, 340, 16, 58));
        assert_eq!(eval_geometry(32, 32, 32, 1.0), (32, 32, 0, 0));
        // Fused eval = resize shorter side then centre crop.
        let img = ramp(20, 14);
        let fused = eval_resize_crop(&img, 8, 0.5);
        let two_step = center_crop(&resize_shorter(&img, 16), 8);
        assert_eq!(resize_shorter(&img, 16).width, 22);
        for (a, b) in fused.rgb.iter().zip(&two_step.rgb) {
            assert!(
                (*a as i32 - *b as i32).abs() <= 1,
                "{:?} vs {:?}",
                fused.rgb,
                two_step.rgb
            );
        }
    }
}
