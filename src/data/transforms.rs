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

use super::Image;
use crate::config::{DataConfig, PadMode, Pipeline};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};

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

// ------------------------------------------------------------------------------------------------
// Geometry on u8 images.

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
    let first = super::stream_rng(seed, 0, index as u64, super::TAG_FLIP).gen_bool(0.5);
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
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

// ------------------------------------------------------------------------------------------------
// Resampling.

/// The filter taps of one output axis: every output sample has the same number `k` of taps
/// (zero-weight taps pad the shorter ones, always inside the allowed source range).
struct Axis {
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
struct Scratch {
    row: Vec<f32>,
    tmp: Vec<f32>,
    hwc: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// `v[..n]`, growing `v` if needed (contents unspecified: callers overwrite all of it).
fn scratch_slice(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
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
fn resample_into(img: &Image, xa: &Axis, ya: &Axis, out: &mut [f32], scratch: &mut Scratch) {
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

fn crop_axes(rect: Rect, out_w: u32, out_h: u32, flip: bool) -> (Axis, Axis) {
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

fn eval_axes(img: &Image, size: u32, crop_ratio: f64) -> (Axis, Axis) {
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

// ------------------------------------------------------------------------------------------------
// Colour.

/// Luma coefficients of the grey level used by contrast and saturation (ITU-R 601, as MXNet/GluonCV).
pub const GREY: [f32; 3] = [0.299, 0.587, 0.114];
/// The ImageNet RGB covariance eigenvalues (0–1 scale), as in fb.resnet.torch and GluonCV.
pub const PCA_EIGVAL: [f32; 3] = [0.2175, 0.0188, 0.0045];
/// The eigenvectors, one per column (`PCA_EIGVEC[channel][k]`).
pub const PCA_EIGVEC: [[f32; 3]; 3] = [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
];

const RGB_TO_YIQ: [[f32; 3]; 3] = [
    [0.299, 0.587, 0.114],
    [0.596, -0.274, -0.321],
    [0.211, -0.523, 0.311],
];
const YIQ_TO_RGB: [[f32; 3]; 3] = [
    [1.0, 0.956, 0.621],
    [1.0, -0.272, -0.647],
    [1.0, -1.107, 1.705],
];

/// One colour operation with its drawn parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColorOp {
    /// x ← f·x.
    Brightness(f32),
    /// x ← f·x + (1 − f)·mean grey of the image.
    Contrast(f32),
    /// x ← f·x + (1 − f)·grey of the pixel.
    Saturation(f32),
    /// Rotation of the YIQ chroma plane by `alpha`·π (`alpha` drawn from U[−hue, hue]).
    Hue(f32),
}

/// The colour jitter of one image (GluonCV `RandomColorJitter` / MXNet `ColorJitterAug`):
/// brightness, contrast and saturation (when `jitter > 0`) and hue (when `hue > 0`) in a random
/// order; each factor is drawn from U[1 − jitter, 1 + jitter], the hue amount from U[−hue, hue].
/// Draws the order first, then the parameters in that order.
pub fn draw_color_ops(jitter: f64, hue: f64, rng: &mut impl Rng) -> Vec<ColorOp> {
    #[derive(Clone, Copy)]
    enum K {
        B,
        C,
        S,
        H,
    }
    let mut kinds: Vec<K> = Vec::with_capacity(4);
    if jitter > 0.0 {
        kinds.extend([K::B, K::C, K::S]);
    }
    if hue > 0.0 {
        kinds.push(K::H);
    }
    kinds.shuffle(rng);
    kinds
        .into_iter()
        .map(|k| match k {
            K::B => ColorOp::Brightness(uniform(rng, 1.0 - jitter, 1.0 + jitter) as f32),
            K::C => ColorOp::Contrast(uniform(rng, 1.0 - jitter, 1.0 + jitter) as f32),
            K::S => ColorOp::Saturation(uniform(rng, 1.0 - jitter, 1.0 + jitter) as f32),
            K::H => ColorOp::Hue(uniform(rng, -hue, hue) as f32),
        })
        .collect()
}

/// The PCA lighting coefficients α ~ N(0, σ)³ (none drawn when σ = 0).
pub fn draw_lighting_alpha(sigma: f64, rng: &mut impl Rng) -> [f32; 3] {
    if sigma <= 0.0 {
        return [0.0; 3];
    }
    let n = Normal::new(0.0, sigma).expect("lighting σ is finite and positive");
    [
        n.sample(rng) as f32,
        n.sample(rng) as f32,
        n.sample(rng) as f32,
    ]
}

/// The lighting offset added to every pixel (0–1 scale): Σ_k eigvec[c][k]·α_k·eigval_k.
pub fn lighting_offset(alpha: [f32; 3]) -> [f32; 3] {
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        *o = (0..3)
            .map(|k| PCA_EIGVEC[c][k] * alpha[k] * PCA_EIGVAL[k])
            .sum();
    }
    out
}

/// The hue rotation matrix (acting on column RGB vectors): YIQ→RGB · R(alpha·π) · RGB→YIQ.
pub fn hue_matrix(alpha: f32) -> [[f32; 3]; 3] {
    let (w, u) = ((alpha as f64) * std::f64::consts::PI).sin_cos();
    let (u, w) = (u as f32, w as f32);
    let bt = [[1.0, 0.0, 0.0], [0.0, u, -w], [0.0, w, u]];
    matmul(&matmul(&YIQ_TO_RGB, &bt), &RGB_TO_YIQ)
}

fn matmul(a: &[[f32; 3]; 3], b: &[[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let mut o = [[0f32; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            o[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    o
}

fn grey(p: &[f32]) -> f32 {
    GREY[0] * p[0] + GREY[1] * p[1] + GREY[2] * p[2]
}

pub fn adjust_brightness(img: &mut FloatImage, f: f32) {
    img.data.iter_mut().for_each(|v| *v *= f);
}

pub fn adjust_contrast(img: &mut FloatImage, f: f32) {
    let m = img.mean();
    let g = (1.0 - f) * (GREY[0] * m[0] + GREY[1] * m[1] + GREY[2] * m[2]);
    img.data.iter_mut().for_each(|v| *v = f * *v + g);
}

pub fn adjust_saturation(img: &mut FloatImage, f: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let g = (1.0 - f) * grey(p);
        p.iter_mut().for_each(|v| *v = f * *v + g);
    }
}

pub fn adjust_hue(img: &mut FloatImage, alpha: f32) {
    let m = hue_matrix(alpha);
    for p in img.data.chunks_exact_mut(3) {
        let x = [p[0], p[1], p[2]];
        for c in 0..3 {
            p[c] = m[c][0] * x[0] + m[c][1] * x[1] + m[c][2] * x[2];
        }
    }
}

/// Adds the PCA lighting noise of coefficients `alpha` (see [`lighting_offset`]).
pub fn add_lighting(img: &mut FloatImage, alpha: [f32; 3]) {
    let d = lighting_offset(alpha);
    for p in img.data.chunks_exact_mut(3) {
        p[0] += d[0];
        p[1] += d[1];
        p[2] += d[2];
    }
}

/// Applies the colour operations one after the other (the reference for [`color_affine`]).
pub fn apply_color_ops(img: &mut FloatImage, ops: &[ColorOp]) {
    for op in ops {
        match *op {
            ColorOp::Brightness(f) => adjust_brightness(img, f),
            ColorOp::Contrast(f) => adjust_contrast(img, f),
            ColorOp::Saturation(f) => adjust_saturation(img, f),
            ColorOp::Hue(a) => adjust_hue(img, a),
        }
    }
}

/// A colour map y = m·x + b on RGB vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub m: [[f32; 3]; 3],
    pub b: [f32; 3],
}

impl Affine {
    pub const IDENTITY: Affine = Affine {
        m: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        b: [0.0; 3],
    };

    pub fn apply(&self, x: [f32; 3]) -> [f32; 3] {
        let mut y = self.b;
        for (c, yc) in y.iter_mut().enumerate() {
            *yc += self.m[c][0] * x[0] + self.m[c][1] * x[1] + self.m[c][2] * x[2];
        }
        y
    }

    /// `next` after `self`.
    pub fn then(&self, next: &Affine) -> Affine {
        Affine {
            m: matmul(&next.m, &self.m),
            b: next.apply(self.b),
        }
    }

    fn linear(m: [[f32; 3]; 3]) -> Affine {
        Affine { m, b: [0.0; 3] }
    }

    fn scaled_identity(f: f32) -> [[f32; 3]; 3] {
        [[f, 0.0, 0.0], [0.0, f, 0.0], [0.0, 0.0, f]]
    }

    /// (x − mean) / std per channel.
    pub fn normalize(mean: [f32; 3], std: [f32; 3]) -> Affine {
        let mut m = [[0f32; 3]; 3];
        let mut b = [0f32; 3];
        for c in 0..3 {
            m[c][c] = 1.0 / std[c];
            b[c] = -mean[c] / std[c];
        }
        Affine { m, b }
    }
}

/// The colour operations as one affine map, for an input image whose mean colour is `mean`
/// (the contrast op needs the mean grey level of its own input, an affine function of `mean`).
pub fn color_affine(ops: &[ColorOp], mean: [f32; 3]) -> Affine {
    let mut cur = Affine::IDENTITY;
    for op in ops {
        let step = match *op {
            ColorOp::Brightness(f) => Affine::linear(Affine::scaled_identity(f)),
            ColorOp::Contrast(f) => {
                let mu = cur.apply(mean);
                let g = (1.0 - f) * grey(&mu);
                Affine {
                    m: Affine::scaled_identity(f),
                    b: [g; 3],
                }
            }
            ColorOp::Saturation(f) => {
                let mut m = Affine::scaled_identity(f);
                for row in m.iter_mut() {
                    for (k, v) in row.iter_mut().enumerate() {
                        *v += (1.0 - f) * GREY[k];
                    }
                }
                Affine::linear(m)
            }
            ColorOp::Hue(a) => Affine::linear(hue_matrix(a)),
        };
        cur = cur.then(&step);
    }
    cur
}

/// Writes (x − mean)/std of `img` (0–1 scale) as CHW into `out`.
pub fn normalize_into(img: &FloatImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    affine_to_chw(&img.data, &Affine::normalize(mean, std), out);
}

/// Applies `a` to every HWC pixel of `hwc` and writes the result as CHW planes into `out`.
fn affine_to_chw(hwc: &[f32], a: &Affine, out: &mut [f32]) {
    let n = hwc.len() / 3;
    assert_eq!(out.len(), 3 * n);
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let m = a.m;
    for (i, p) in hwc.chunks_exact(3).enumerate() {
        r[i] = m[0][0] * p[0] + m[0][1] * p[1] + m[0][2] * p[2] + a.b[0];
        g[i] = m[1][0] * p[0] + m[1][1] * p[1] + m[1][2] * p[2] + a.b[1];
        b[i] = m[2][0] * p[0] + m[2][1] * p[1] + m[2][2] * p[2] + a.b[2];
    }
}

// ------------------------------------------------------------------------------------------------
// Pipelines.

/// The training and evaluation pipelines of a [`DataConfig`], writing normalised CHW f32.
#[derive(Clone, Debug)]
pub struct Transform {
    pub pipeline: Pipeline,
    pub train_size: u32,
    pub val_size: u32,
    pub val_crop_ratio: f64,
    pub rrc_area: [f64; 2],
    pub rrc_aspect: [f64; 2],
    pub flip: bool,
    /// `data.alternate_flip`: the loader decides each flip by [`alternating_flip`].
    pub alternate_flip: bool,
    pub jitter: f64,
    pub hue: f64,
    pub lighting: f64,
    pub cifar_pad: u32,
    pub pad_mode: PadMode,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// (v/255 − mean)/std for every u8 value, per channel.
    lut: [[f32; 256]; 3],
}

impl Transform {
    pub fn new(cfg: &DataConfig) -> Transform {
        let mean = cfg.mean.map(|v| v as f32);
        let std = cfg.std.map(|v| v as f32);
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, x) in table.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Transform {
            pipeline: cfg.pipeline,
            train_size: cfg.train_size,
            val_size: cfg.val_size,
            val_crop_ratio: cfg.val_crop_ratio,
            rrc_area: cfg.rrc_area,
            rrc_aspect: cfg.rrc_aspect,
            flip: cfg.flip,
            alternate_flip: cfg.alternate_flip,
            jitter: cfg.jitter,
            hue: cfg.hue,
            lighting: cfg.lighting,
            cifar_pad: cfg.cifar_pad,
            pad_mode: cfg.pad_mode,
            mean,
            std,
            lut,
        }
    }

    /// Floats per training sample (3·train_size²).
    pub fn train_len(&self) -> usize {
        3 * self.train_size as usize * self.train_size as usize
    }

    /// Floats per evaluation sample (3·val_size²).
    pub fn eval_len(&self) -> usize {
        3 * self.val_size as usize * self.val_size as usize
    }

    /// Normalises a u8 image through the lookup table into CHW `out`.
    pub fn normalize_u8_into(&self, img: &Image, out: &mut [f32]) {
        let n = img.width as usize * img.height as usize;
        assert_eq!(out.len(), 3 * n);
        let (r, rest) = out.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (i, p) in img.rgb.chunks_exact(3).enumerate() {
            r[i] = self.lut[0][p[0] as usize];
            g[i] = self.lut[1][p[1] as usize];
            b[i] = self.lut[2][p[2] as usize];
        }
    }

    /// The training transform of the configured pipeline into `out` (3·train_size² floats),
    /// flipping at random when `data.flip`.
    pub fn train_into(&self, img: &Image, rng: &mut impl Rng, out: &mut [f32]) {
        let flip = if self.flip { Flip::Random } else { Flip::Never };
        self.train_flipped_into(img, rng, flip, out)
    }

    /// [`Transform::train_into`] with the flip given.
    pub fn train_flipped_into(&self, img: &Image, rng: &mut impl Rng, flip: Flip, out: &mut [f32]) {
        assert_eq!(out.len(), self.train_len());
        let s = self.train_size;
        match self.pipeline {
            Pipeline::Cifar => {
                let cropped = random_pad_crop(img, self.cifar_pad, self.pad_mode, s, flip, rng);
                self.normalize_u8_into(&cropped, out);
            }
            Pipeline::Imagenet => {
                let rect = random_resized_crop_rect(
                    img.width,
                    img.height,
                    self.rrc_area,
                    self.rrc_aspect,
                    rng,
                );
                let flip = flip.draw(rng);
                let ops = draw_color_ops(self.jitter, self.hue, rng);
                let alpha = draw_lighting_alpha(self.lighting, rng);
                let (xa, ya) = crop_axes(rect, s, s, flip);
                with_scratch(|sc| {
                    let mut hwc = std::mem::take(&mut sc.hwc);
                    let buf = scratch_slice(&mut hwc, self.train_len());
                    resample_into(img, &xa, &ya, buf, sc);
                    // 0–255 → 0–1, colour ops, lighting, normalisation: one affine map.
                    let to_unit = Affine::linear(Affine::scaled_identity(1.0 / 255.0));
                    let colour = if ops.is_empty() {
                        Affine::IDENTITY
                    } else {
                        color_affine(&ops, mean_rgb(buf, 1.0 / 255.0))
                    };
                    let light = Affine {
                        m: Affine::IDENTITY.m,
                        b: lighting_offset(alpha),
                    };
                    let a = to_unit
                        .then(&colour)
                        .then(&light)
                        .then(&Affine::normalize(self.mean, self.std));
                    affine_to_chw(buf, &a, out);
                    sc.hwc = hwc;
                });
            }
        }
    }

    /// The evaluation transform into `out` (3·val_size² floats).
    pub fn eval_into(&self, img: &Image, out: &mut [f32]) {
        assert_eq!(out.len(), self.eval_len());
        let s = self.val_size;
        if self.pipeline == Pipeline::Cifar && img.width == s && img.height == s {
            self.normalize_u8_into(img, out);
            return;
        }
        let (xa, ya) = eval_axes(img, s, self.val_crop_ratio);
        with_scratch(|sc| {
            let mut hwc = std::mem::take(&mut sc.hwc);
            let buf = scratch_slice(&mut hwc, self.eval_len());
            resample_into(img, &xa, &ya, buf, sc);
            let to_unit = Affine::linear(Affine::scaled_identity(1.0 / 255.0));
            affine_to_chw(
                buf,
                &to_unit.then(&Affine::normalize(self.mean, self.std)),
                out,
            );
            sc.hwc = hwc;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ramp(w: u32, h: u32) -> Image {
        let mut rgb = Vec::new();
        for y in 0..h {
            for x in 0..w {
                rgb.extend_from_slice(&[(x * 10 + 1) as u8, (y * 10 + 2) as u8, (x + y) as u8]);
            }
        }
        Image::from_rgb(w, h, rgb)
    }

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }

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

    #[test]
    fn normalisation_values() {
        let cfg = DataConfig {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 2.0],
            ..DataConfig::default()
        };
        let t = Transform::new(&cfg);
        let img = Image::from_rgb(2, 1, vec![0, 255, 51, 255, 0, 102]);
        let mut out = vec![0f32; 6];
        t.normalize_u8_into(&img, &mut out);
        let expect = [-1.0, 1.0, 3.0, -1.0, 0.1, 0.2];
        for (a, b) in out.iter().zip(expect) {
            assert!(close(*a, b, 1e-6), "{out:?}");
        }
        let mut out2 = vec![0f32; 6];
        normalize_into(&FloatImage::from_image(&img), t.mean, t.std, &mut out2);
        assert!(out.iter().zip(&out2).all(|(a, b)| close(*a, *b, 1e-6)));
    }

    #[test]
    fn lighting_matches_hand_formula() {
        let alpha = [0.1f32, -0.2, 0.3];
        let d = lighting_offset(alpha);
        // R: -0.5675·0.1·0.2175 + 0.7192·(−0.2)·0.0188 + 0.4009·0.3·0.0045
        let r = -0.5675 * 0.1 * 0.2175 + 0.7192 * -0.2 * 0.0188 + 0.4009 * 0.3 * 0.0045;
        let g = -0.5808 * 0.1 * 0.2175 + -0.0045 * -0.2 * 0.0188 + -0.8140 * 0.3 * 0.0045;
        let b = -0.5836 * 0.1 * 0.2175 + -0.6948 * -0.2 * 0.0188 + 0.4203 * 0.3 * 0.0045;
        assert!(
            close(d[0], r, 1e-7) && close(d[1], g, 1e-7) && close(d[2], b, 1e-7),
            "{d:?}"
        );
        let mut img = FloatImage::from_image(&ramp(3, 3));
        let before = img.clone();
        add_lighting(&mut img, alpha);
        for (a, b) in img.data.chunks(3).zip(before.data.chunks(3)) {
            for c in 0..3 {
                assert!(close(a[c] - b[c], d[c], 1e-6));
            }
        }
    }

    #[test]
    fn jitter_factor_one_is_identity() {
        let img = FloatImage::from_image(&ramp(6, 5));
        let mut x = img.clone();
        apply_color_ops(
            &mut x,
            &[
                ColorOp::Brightness(1.0),
                ColorOp::Contrast(1.0),
                ColorOp::Saturation(1.0),
            ],
        );
        assert!(x
            .data
            .iter()
            .zip(&img.data)
            .all(|(a, b)| close(*a, *b, 1e-6)));
        let a = color_affine(
            &[
                ColorOp::Saturation(1.0),
                ColorOp::Contrast(1.0),
                ColorOp::Brightness(1.0),
            ],
            img.mean(),
        );
        assert_eq!(a, Affine::IDENTITY);
        // Hue 0 is the identity up to the rounding of the published YIQ matrices.
        let mut h = img.clone();
        adjust_hue(&mut h, 0.0);
        assert!(h
            .data
            .iter()
            .zip(&img.data)
            .all(|(a, b)| close(*a, *b, 2e-3)));
        // jitter = hue = 0: no ops and no random draws.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert!(draw_color_ops(0.0, 0.0, &mut rng).is_empty());
        assert_eq!(rng.get_word_pos(), 0);
    }

    #[test]
    fn colour_ops_hand_values() {
        let mut img = FloatImage {
            width: 2,
            height: 1,
            data: vec![0.2, 0.4, 0.6, 1.0, 0.0, 0.5],
        };
        adjust_brightness(&mut img, 0.5);
        assert_eq!(img.data, vec![0.1, 0.2, 0.3, 0.5, 0.0, 0.25]);
        let mut s = FloatImage {
            width: 1,
            height: 1,
            data: vec![0.2, 0.4, 0.6],
        };
        adjust_saturation(&mut s, 0.0);
        let g = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6;
        assert!(s.data.iter().all(|&v| close(v, g, 1e-6)));
        let mut c = FloatImage {
            width: 2,
            height: 1,
            data: vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        };
        adjust_contrast(&mut c, 0.5);
        // Mean grey 0.5: 0 → 0.25, 1 → 0.75.
        assert!(close(c.data[0], 0.25, 1e-6) && close(c.data[5], 0.75, 1e-6));
        // A half-turn hue rotation keeps the luma (Y) of a pixel.
        let mut h = FloatImage {
            width: 1,
            height: 1,
            data: vec![0.8, 0.3, 0.1],
        };
        let y0 = grey(&h.data);
        adjust_hue(&mut h, 1.0);
        assert!(close(grey(&h.data), y0, 2e-3), "{:?}", h.data);
        assert!(h.data[0] < 0.8);
    }

    #[test]
    fn fused_colour_affine_equals_sequential_ops() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let img = FloatImage::from_image(&ramp(7, 6));
        for _ in 0..20 {
            let ops = draw_color_ops(0.4, 0.4, &mut rng);
            assert_eq!(ops.len(), 4);
            let mut seq = img.clone();
            apply_color_ops(&mut seq, &ops);
            let a = color_affine(&ops, img.mean());
            for (p, q) in img.data.chunks(3).zip(seq.data.chunks(3)) {
                let y = a.apply([p[0], p[1], p[2]]);
                for c in 0..3 {
                    assert!(close(y[c], q[c], 1e-5), "{ops:?}: {y:?} vs {q:?}");
                }
            }
        }
    }

    #[test]
    fn colour_op_order_is_random() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let ops = draw_color_ops(0.4, 0.0, &mut rng);
            assert_eq!(ops.len(), 3);
            firsts.insert(std::mem::discriminant(&ops[0]));
            for op in ops {
                match op {
                    ColorOp::Brightness(f) | ColorOp::Contrast(f) | ColorOp::Saturation(f) => {
                        assert!((0.6..=1.4).contains(&f))
                    }
                    ColorOp::Hue(_) => panic!("hue drawn with hue = 0"),
                }
            }
        }
        assert_eq!(firsts.len(), 3);
    }

    fn cfg_imagenet(size: u32) -> DataConfig {
        DataConfig {
            pipeline: Pipeline::Imagenet,
            train_size: size,
            val_size: size,
            ..DataConfig::default()
        }
    }

    #[test]
    fn imagenet_train_equals_reference_chain() {
        // The fused pipeline = RRC + flip via the pure functions, colour ops one by one, lighting,
        // normalisation, with the same random draws.
        let cfg = cfg_imagenet(24);
        let t = Transform::new(&cfg);
        let img = ramp(40, 30);
        for seed in 0..10 {
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut ChaCha8Rng::seed_from_u64(seed), &mut out);

            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rect = random_resized_crop_rect(40, 30, cfg.rrc_area, cfg.rrc_aspect, &mut rng);
            let flip = rng.gen_bool(0.5);
            let ops = draw_color_ops(cfg.jitter, cfg.hue, &mut rng);
            let alpha = draw_lighting_alpha(cfg.lighting, &mut rng);
            let mut x = resized_crop_f32(&img, rect, 24, 24, false);
            if flip {
                let mut u = x.clone();
                for y in 0..24 {
                    for j in 0..24 {
                        let (d, s) = ((y * 24 + j) * 3, (y * 24 + 23 - j) * 3);
                        u.data[d..d + 3].copy_from_slice(&x.data[s..s + 3]);
                    }
                }
                x = u;
            }
            apply_color_ops(&mut x, &ops);
            add_lighting(&mut x, alpha);
            let mut expect = vec![0f32; t.train_len()];
            normalize_into(&x, t.mean, t.std, &mut expect);
            for (a, b) in out.iter().zip(&expect) {
                assert!(close(*a, *b, 1e-4), "seed {seed}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn cifar_train_and_eval() {
        let cfg = DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 32,
            val_size: 32,
            ..DataConfig::default()
        };
        let t = Transform::new(&cfg);
        let img = ramp(32, 32);
        let mut out = vec![0f32; t.train_len()];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        t.train_into(&img, &mut rng, &mut out);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let expect_img = random_pad_crop(&img, 4, PadMode::Zeros, 32, Flip::Random, &mut rng);
        let mut expect = vec![0f32; t.train_len()];
        t.normalize_u8_into(&expect_img, &mut expect);
        assert_eq!(out, expect);
        // Eval of a 32-px image is the identity + normalisation.
        let mut ev = vec![0f32; t.eval_len()];
        t.eval_into(&img, &mut ev);
        let mut id = vec![0f32; t.eval_len()];
        t.normalize_u8_into(&img, &mut id);
        assert_eq!(ev, id);
        // Padding is black: (0 − mean)/std.
        let c = pad_crop(&img, 4, PadMode::Zeros, 32, 0, 0, false);
        let mut o = vec![0f32; t.train_len()];
        t.normalize_u8_into(&c, &mut o);
        assert!(close(o[0], -0.485 / 0.229, 1e-6));
    }

    #[test]
    fn imagenet_eval_matches_reference() {
        let mut cfg = cfg_imagenet(16);
        cfg.val_crop_ratio = 0.8;
        let t = Transform::new(&cfg);
        let img = ramp(30, 25);
        let mut out = vec![0f32; t.eval_len()];
        t.eval_into(&img, &mut out);
        let (rw, rh, left, top) = eval_geometry(30, 25, 16, 0.8);
        assert_eq!((rw, rh, left, top), (24, 20, 4, 2));
        let r = resize(&img, rw, rh);
        let c = crop(
            &r,
            Rect {
                x: left,
                y: top,
                width: 16,
                height: 16,
            },
        );
        let mut expect = vec![0f32; t.eval_len()];
        t.normalize_u8_into(&c, &mut expect);
        // The reference rounds to u8 once: within half a level.
        let tol = 0.5 / 255.0 / 0.224 + 1e-5;
        for (a, b) in out.iter().zip(&expect) {
            assert!(close(*a, *b, tol), "{a} vs {b}");
        }
    }

    #[test]
    fn shapes_for_odd_inputs() {
        let t = Transform::new(&cfg_imagenet(8));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (w, h) in [(1, 1), (1, 50), (50, 1), (3, 2), (8, 8), (200, 9)] {
            let img = ramp(w, h);
            let mut out = vec![0f32; t.train_len()];
            t.train_into(&img, &mut rng, &mut out);
            assert!(out.iter().all(|v| v.is_finite()));
            let mut ev = vec![0f32; t.eval_len()];
            t.eval_into(&img, &mut ev);
            assert!(ev.iter().all(|v| v.is_finite()));
        }
        let c = Transform::new(&DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 8,
            val_size: 8,
            cifar_pad: 1,
            ..DataConfig::default()
        });
        for (w, h) in [(2, 2), (8, 8), (20, 3)] {
            let mut out = vec![0f32; c.train_len()];
            c.train_into(&ramp(w, h), &mut rng, &mut out);
            let mut ev = vec![0f32; c.eval_len()];
            c.eval_into(&ramp(w, h), &mut ev);
        }
    }
}
