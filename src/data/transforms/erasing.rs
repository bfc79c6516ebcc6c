//! Random erasing (Zhong et al. 2020) as timm's `RandomErasing` applies it in "pixel" mode, on a
//! normalised CHW image: with probability `p`, up to 10 attempts to place a rectangle of a random
//! area fraction (uniform in `area`) and aspect ratio (log-uniform in `aspect`) inside the image;
//! the first that fits is filled with independent N(0, 1) values (noise in the normalised space).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Random erasing's settings (`data.erase_prob`, `data.erase_area`, `data.erase_aspect`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Erasing {
    pub p: f64,
    pub area: [f64; 2],
    pub aspect: [f64; 2],
}

impl Erasing {
    /// The rectangle drawn for an `h`×`w` image (rows `top..top + eh`, columns
    /// `left..left + ew`) as `(top, left, eh, ew)`, or `None` when the image is not erased:
    /// timm's `_erase` with one rectangle.
    pub fn rect(&self, h: usize, w: usize, rng: &mut impl Rng) -> Option<[usize; 4]> {
        if rng.gen::<f64>() >= self.p {
            return None;
        }
        let total = (h * w) as f64;
        let (lo, hi) = (self.aspect[0].ln(), self.aspect[1].ln());
        for _ in 0..10 {
            let target = rng.gen_range(self.area[0]..=self.area[1]) * total;
            let ratio = if hi > lo { rng.gen_range(lo..hi) } else { lo }.exp();
            let eh = (target * ratio).sqrt().round() as usize;
            let ew = (target / ratio).sqrt().round() as usize;
            if ew < w && eh < h {
                let top = rng.gen_range(0..=h - eh);
                let left = rng.gen_range(0..=w - ew);
                return Some([top, left, eh, ew]);
            }
        }
        None
    }

    /// Erases one rectangle of `chw` (`channels`×`h`×`w`, normalised) as [`Erasing::rect`]
    /// draws it.
    pub fn apply(&self, chw: &mut [f32], channels: usize, h: usize, w: usize, rng: &mut impl Rng) {
        let Some([top, left, eh, ew]) = self.rect(h, w, rng) else {
            return;
        };
        for c in 0..channels {
            for y in top..top + eh {
                let start = (c * h + y) * w + left;
                for v in &mut chw[start..start + ew] {
                    *v = StandardNormal.sample(rng);
                }
            }
        }
    }
}
