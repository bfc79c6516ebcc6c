//! Colour: brightness / contrast / saturation / hue, PCA lighting, their composition into one
//! affine map, and normalisation.

use super::geometry::uniform;
use super::FloatImage;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};

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

    pub(super) fn linear(m: [[f32; 3]; 3]) -> Affine {
        Affine { m, b: [0.0; 3] }
    }

    pub(super) fn scaled_identity(f: f32) -> [[f32; 3]; 3] {
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
pub(super) fn affine_to_chw(hwc: &[f32], a: &Affine, out: &mut [f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transforms::test_support::{close, ramp};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

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
}
