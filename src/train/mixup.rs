//! Mixup training (paper §5.4, Zhang et al. 2018): train on convex blends of random pairs.

use super::derive_seed;
use crate::config::Config;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use tch::Tensor;

/// Mixup as the run uses it, built once from the config (`mixup.alpha`, `mixup.off_epochs`):
/// its draws for a batch are a function of (seed, epoch, step), so a resumed run replays them.
#[derive(Debug, Clone, Copy)]
pub struct Mixup {
    alpha: f64,
    /// The last epoch that mixes (mixup is off for the final `mixup.off_epochs`).
    last_epoch: usize,
    seed: u64,
}

impl Mixup {
    /// `None` when `mixup.alpha` is 0.
    pub fn from_config(cfg: &Config) -> Option<Mixup> {
        (cfg.mixup.alpha > 0.0).then(|| Mixup {
            alpha: cfg.mixup.alpha,
            last_epoch: cfg.train.epochs.saturating_sub(cfg.mixup.off_epochs),
            seed: cfg.seed,
        })
    }

    /// Whether the batches of `epoch` are mixed.
    pub fn active(&self, epoch: usize) -> bool {
        epoch <= self.last_epoch
    }

    /// The batch at (`epoch`, `step`) blended with a permutation of itself, inputs and target
    /// distributions alike, λ and the permutation drawn for that step.
    pub fn apply(
        &self,
        epoch: usize,
        step: usize,
        x: &Tensor,
        targets: &Tensor,
    ) -> (Tensor, Tensor) {
        let stream = derive_seed(self.seed, "mixup", epoch as u64, step as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        let lambda = sample_lambda(&mut rng, self.alpha);
        let perm = permutation(&mut rng, x.size()[0] as usize);
        mixup(x, targets, lambda, &perm)
    }
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
