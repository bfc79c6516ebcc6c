//! Mixup training (paper §5.4, Zhang et al. 2018): train on convex blends of random pairs; and
//! CutMix (Yun et al. 2019), which pastes a box of the partner image instead of blending, the
//! target weights corrected to the box's true area. Both as timm's `Mixup` combines them: a batch
//! is mixed with probability `mixup.prob`, and when both are on it uses CutMix with probability
//! `mixup.switch_prob`.

use super::derive_seed;
use crate::config::Config;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use tch::Tensor;

/// Mixup and CutMix as the run uses them, built once from the config (`mixup.alpha`,
/// `cutmix.alpha`, `mixup.prob`, `mixup.switch_prob`, `mixup.off_epochs`): the draws for a batch
/// are a function of (seed, epoch, step), so a resumed run replays them.
#[derive(Debug, Clone, Copy)]
pub struct Mixup {
    alpha: f64,
    cutmix_alpha: f64,
    prob: f64,
    switch_prob: f64,
    /// The last epoch that mixes (mixing is off for the final `mixup.off_epochs`).
    last_epoch: usize,
    seed: u64,
}

/// How one batch is mixed: the weight λ of each example's own target, its partner, and for
/// CutMix the pasted box.
#[derive(Debug, Clone, PartialEq)]
pub struct MixDraw {
    pub lambda: f64,
    pub perm: Vec<i64>,
    pub cut: Option<CutBox>,
}

/// A CutMix box: rows `y0..y1`, columns `x0..x1` (possibly empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutBox {
    pub y0: i64,
    pub y1: i64,
    pub x0: i64,
    pub x1: i64,
}

impl CutBox {
    fn area(&self) -> i64 {
        (self.y1 - self.y0) * (self.x1 - self.x0)
    }
}

impl Mixup {
    /// `None` when both `mixup.alpha` and `cutmix.alpha` are 0.
    pub fn from_config(cfg: &Config) -> Option<Mixup> {
        (cfg.mixup.alpha > 0.0 || cfg.cutmix.alpha > 0.0).then(|| Mixup {
            alpha: cfg.mixup.alpha,
            cutmix_alpha: cfg.cutmix.alpha,
            prob: cfg.mixup.prob,
            switch_prob: cfg.mixup.switch_prob,
            last_epoch: cfg.train.epochs.saturating_sub(cfg.mixup.off_epochs),
            seed: cfg.seed,
        })
    }

    /// Whether the batches of `epoch` are mixed.
    pub fn active(&self, epoch: usize) -> bool {
        epoch <= self.last_epoch
    }

    /// The draws of the batch at (`epoch`, `step`) of `n` images of `height`×`width`; `None`
    /// when this batch is not mixed (`mixup.prob`). With mixup alone and `prob` 1 the draws are
    /// λ then the permutation, as before CutMix existed, so such runs are unchanged.
    pub fn draw(
        &self,
        epoch: usize,
        step: usize,
        n: usize,
        height: i64,
        width: i64,
    ) -> Option<MixDraw> {
        let stream = derive_seed(self.seed, "mixup", epoch as u64, step as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        if self.prob < 1.0 && rng.gen::<f64>() >= self.prob {
            return None;
        }
        let use_cutmix = match (self.alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.gen::<f64>() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.alpha
        };
        let lambda = sample_lambda(&mut rng, alpha);
        let perm = permutation(&mut rng, n);
        if !use_cutmix {
            return Some(MixDraw {
                lambda,
                perm,
                cut: None,
            });
        }
        let cy = rng.gen_range(0..height);
        let cx = rng.gen_range(0..width);
        let (cut, lambda) = cutmix_box(height, width, lambda, cy, cx);
        Some(MixDraw {
            lambda,
            perm,
            cut: Some(cut),
        })
    }

    /// The batch at (`epoch`, `step`) mixed with a permutation of itself, inputs and target
    /// distributions alike (unchanged when the batch is not mixed).
    pub fn apply(
        &self,
        epoch: usize,
        step: usize,
        x: &Tensor,
        targets: &Tensor,
    ) -> (Tensor, Tensor) {
        let size = x.size();
        let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
        match self.draw(epoch, step, size[0] as usize, h, w) {
            None => (x.shallow_clone(), targets.shallow_clone()),
            Some(MixDraw {
                lambda,
                perm,
                cut: None,
            }) => mixup(x, targets, lambda, &perm),
            Some(MixDraw {
                lambda,
                perm,
                cut: Some(b),
            }) => cutmix(x, targets, lambda, &perm, b),
        }
    }
}

/// timm's `rand_bbox` + `cutmix_bbox_and_lam` (with `correct_lam`) for a box centred at
/// (`cy`, `cx`): sides `int(h·√(1-λ))` × `int(w·√(1-λ))` (timm 1.0's rounding: the extra
/// pixel of an odd side below and right of the centre), clipped to the image, and λ corrected
/// to `1 - area / (h·w)`, the share of each example that stays its own.
pub fn cutmix_box(height: i64, width: i64, lambda: f64, cy: i64, cx: i64) -> (CutBox, f64) {
    let ratio = (1.0 - lambda).max(0.0).sqrt();
    let (cut_h, cut_w) = (
        (height as f64 * ratio) as i64,
        (width as f64 * ratio) as i64,
    );
    let b = CutBox {
        y0: (cy - cut_h / 2).clamp(0, height),
        y1: (cy + (cut_h + 1) / 2).clamp(0, height),
        x0: (cx - cut_w / 2).clamp(0, width),
        x1: (cx + (cut_w + 1) / 2).clamp(0, width),
    };
    let lambda = 1.0 - b.area() as f64 / (height * width) as f64;
    (b, lambda)
}

/// Pastes each partner's `b` region into each example (`x'[i] = x[i]` outside the box,
/// `x[perm[i]]` inside) and blends the targets with `lambda` (the box-corrected weight):
/// `y' = λ y + (1-λ) y[perm]`. No gradient is tracked.
pub fn cutmix(
    images: &Tensor,
    target_probs: &Tensor,
    lambda: f64,
    perm: &[i64],
    b: CutBox,
) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let idx = crate::device::upload(&Tensor::from_slice(perm), images.device());
        let out = images.copy();
        if b.area() > 0 {
            let region = |t: &Tensor| t.narrow(2, b.y0, b.y1 - b.y0).narrow(3, b.x0, b.x1 - b.x0);
            region(&out).copy_(&region(&images.index_select(0, &idx)));
        }
        let y = target_probs * lambda + target_probs.index_select(0, &idx) * (1.0 - lambda);
        (out, y)
    })
}

/// Draws the blend weight λ ~ Beta(α, α) from `rng` (seeded, so runs are reproducible).
/// `α <= 0` means mixup is off and returns 1.0, which leaves every example unchanged.
pub fn sample_lambda(rng: &mut impl rand::Rng, alpha: f64) -> f64 {
    if alpha <= 0.0 {
        return 1.0;
    }
    Beta::new(alpha, alpha)
        .expect("Beta(α, α) with α > 0")
        .sample(rng)
}

/// A uniformly random permutation of `0..n` from `rng`: the partner of each example.
pub fn permutation(rng: &mut impl rand::Rng, n: usize) -> Vec<i64> {
    let mut p: Vec<i64> = (0..n as i64).collect();
    p.shuffle(rng);
    p
}

/// Blends each example with its partner `perm[i]` (§5.4): `x' = λ x + (1-λ) x[perm]` and
/// `y' = λ y + (1-λ) y[perm]`. Targets are (possibly smoothed) probabilities, so mixup composes
/// with label smoothing and the result still sums to 1 per row. No gradient is tracked.
pub fn mixup(
    images: &Tensor,
    target_probs: &Tensor,
    lambda: f64,
    perm: &[i64],
) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let idx = crate::device::upload(&Tensor::from_slice(perm), images.device());
        let blend = |t: &Tensor| t * lambda + t.index_select(0, &idx) * (1.0 - lambda);
        (blend(images), blend(target_probs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::smooth_targets;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use tch::Kind;

    fn vecf(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn close_all(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6 * (1.0 + y.abs()), "{a:?} != {b:?}");
        }
    }

    #[test]
    fn blend_values() {
        // 3 "images" of 2 pixels; perm = [2, 0, 1]; λ = 0.7.
        let x = Tensor::from_slice(&[1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0]).view([3, 1, 2]);
        let y = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5]).view([3, 2]);
        let (xm, ym) = mixup(&x, &y, 0.7, &[2, 0, 1]);
        assert_eq!(xm.size(), [3, 1, 2]);
        close_all(
            &vecf(&xm),
            &[
                0.7 + 30.0,
                1.4 + 60.0,
                7.0 + 0.3,
                14.0 + 0.6,
                70.0 + 3.0,
                140.0 + 6.0,
            ],
        );
        close_all(&vecf(&ym), &[0.85, 0.15, 0.3, 0.7, 0.35, 0.65]);
        // λ = 1 leaves the batch unchanged.
        let (x1, _) = mixup(&x, &y, 1.0, &[2, 0, 1]);
        close_all(&vecf(&x1), &vecf(&x));
    }

    #[test]
    fn lambda_statistics() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        assert_eq!(sample_lambda(&mut rng, 0.0), 1.0);
        let alpha = 0.2;
        let n = 20_000;
        let v: Vec<f64> = (0..n).map(|_| sample_lambda(&mut rng, alpha)).collect();
        assert!(v.iter().all(|&l| (0.0..=1.0).contains(&l)));
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n as f64;
        let want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0)); // 0.1786
        assert!((mean - 0.5).abs() < 0.015, "mean {mean}");
        assert!((var - want_var).abs() < 0.01, "var {var} vs {want_var}");
        // Beta(0.2, 0.2) is U-shaped: ≈ 66 % of the mass within 0.1 of an end, ≈ 6 % in [0.4, 0.6].
        let tails = v.iter().filter(|&&l| !(0.1..=0.9).contains(&l)).count() as f64 / n as f64;
        let middle = v.iter().filter(|&&l| (0.4..=0.6).contains(&l)).count() as f64 / n as f64;
        assert!(tails > 0.6, "tails {tails}");
        assert!(middle < 0.1, "middle {middle}");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut p = permutation(&mut rng, 50);
        assert_ne!(p, (0..50).collect::<Vec<i64>>());
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<i64>>());
        let again = permutation(&mut ChaCha8Rng::seed_from_u64(1), 50);
        assert_eq!(again, permutation(&mut ChaCha8Rng::seed_from_u64(1), 50));
    }

    #[test]
    fn composes_with_label_smoothing() {
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let q = smooth_targets(&labels, 5, 0.1);
        let x = Tensor::zeros([4, 3], (Kind::Float, tch::Device::Cpu));
        let (_, ym) = mixup(&x, &q, 0.3, &[1, 0, 3, 2]);
        for s in vecf(&ym.sum_dim_intlist(-1, false, Kind::Double)) {
            assert!((s - 1.0).abs() < 1e-6);
        }
        // Row 0 mixes class 0 (0.3) with class 1 (0.7): 0.3*0.9 + 0.7*0.025 on class 0.
        let row0 = &vecf(&ym)[..5];
        close_all(
            row0,
            &[
                0.3 * 0.9 + 0.7 * 0.025,
                0.3 * 0.025 + 0.7 * 0.9,
                0.025,
                0.025,
                0.025,
            ],
        );
    }
}
