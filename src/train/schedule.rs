//! Learning-rate schedules: linear scaling of the peak lr and linear warmup (paper §3.1),
//! followed by step decay or per-iteration cosine decay (paper §5.1).

use crate::config::{OptimConfig, Schedule};

/// Effective peak learning rate after linear scaling (paper §3.1), for a run on `world_size`
/// processes: `batch_size` (`train.batch_size`) is per process, the scaling uses the global
/// batch.
pub fn peak_lr(optim: &OptimConfig, batch_size: usize, world_size: usize) -> f64 {
    if optim.linear_scaling {
        optim.lr * (batch_size * world_size.max(1)) as f64 / optim.lr_reference_batch as f64
    } else {
        optim.lr
    }
}

/// The lr as a pure function of the global iteration, so a resumed run gets the same lr.
#[derive(Debug, Clone)]
pub struct LrSchedule {
    peak_lr: f64,
    warmup_start_lr: f64,
    warmup_iters: usize,
    total_iters: usize,
    iters_per_epoch: usize,
    kind: Schedule,
    step_epochs: Vec<usize>,
    step_gamma: f64,
    triangle: [f64; 3],
}

impl LrSchedule {
    /// Builds the schedule of a run of `epochs` epochs of `iters_per_epoch` iterations.
    /// `peak_lr` is already linearly scaled by the caller ([`peak_lr`], paper §3.1).
    /// Warmup spans `round(warmup_epochs * iters_per_epoch)` iterations.
    pub fn new(optim: &OptimConfig, peak_lr: f64, iters_per_epoch: usize, epochs: usize) -> Self {
        let iters_per_epoch = iters_per_epoch.max(1);
        LrSchedule {
            peak_lr,
            warmup_start_lr: optim.warmup_start_lr,
            warmup_iters: (optim.warmup_epochs.max(0.0) * iters_per_epoch as f64).round() as usize,
            total_iters: epochs * iters_per_epoch,
            iters_per_epoch,
            kind: optim.schedule,
            step_epochs: optim.step_epochs.clone(),
            step_gamma: optim.step_gamma,
            triangle: optim.triangle,
        }
    }

    /// The lr for global iteration `iter` (0-based), updated every iteration.
    ///
    /// Warmup (§3.1): `start + (peak - start) * iter / W` for `iter < W`, so iteration 0 uses
    /// `start` and iteration `W` the peak. Step: `peak * gamma^#{m in step_epochs : m <= epoch}`.
    /// Cosine (§5.1): `½(1 + cos(π t / T)) peak` with `t = iter - W`, `T = total - W`, i.e. the
    /// decay starts after warmup so the first post-warmup iteration is exactly the peak.
    pub fn lr_at(&self, iter: usize) -> f64 {
        let w = self.warmup_iters;
        if iter < w {
            return self.warmup_start_lr
                + (self.peak_lr - self.warmup_start_lr) * iter as f64 / w as f64;
        }
        match self.kind {
            Schedule::Step => {
                let epoch = iter / self.iters_per_epoch;
                let drops = self.step_epochs.iter().filter(|&&m| m <= epoch).count();
                self.peak_lr * self.step_gamma.powi(drops as i32)
            }
            Schedule::Cosine => {
                let t = (iter - w) as f64;
                let big_t = self.total_iters.saturating_sub(w).max(1) as f64;
                let t = t.min(big_t);
                0.5 * (1.0 + (std::f64::consts::PI * t / big_t).cos()) * self.peak_lr
            }
            Schedule::Triangle => {
                // airbench94's `triangle`: np.interp over [0, int(peak·T), T] of [start, 1, end].
                let [start, peak, end] = self.triangle;
                let t = (iter - w) as f64;
                let big_t = self.total_iters.saturating_sub(w).max(1) as f64;
                let top = (peak * big_t).floor().max(1.0);
                let factor = if t <= top {
                    start + (1.0 - start) * t / top
                } else {
                    1.0 + (end - 1.0) * ((t - top) / (big_t - top).max(1.0)).min(1.0)
                };
                factor * self.peak_lr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    fn optim(kind: Schedule, warmup_epochs: f64) -> OptimConfig {
        OptimConfig {
            schedule: kind,
            warmup_epochs,
            warmup_start_lr: 0.0,
            step_epochs: vec![30, 60, 90],
            step_gamma: 0.1,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn triangle_rises_to_the_peak_then_falls_as_airbench94s() {
        let o = OptimConfig {
            schedule: Schedule::Triangle,
            triangle: [0.2, 0.23, 0.07],
            ..OptimConfig::default()
        };
        // 10 epochs of 48 steps: T = 480, peak at int(0.23·480) = 110.
        let s = LrSchedule::new(&o, 2.0, 48, 10);
        close(s.lr_at(0), 0.4);
        close(s.lr_at(55), 2.0 * (0.2 + 0.8 * 55.0 / 110.0));
        close(s.lr_at(110), 2.0);
        close(s.lr_at(295), 2.0 * (1.0 - 0.93 * 185.0 / 370.0));
        close(s.lr_at(480), 0.14);
        close(s.lr_at(1000), 0.14);
    }

    #[test]
    fn linear_scaling_peak() {
        let mut c = Config::default();
        c.optim.lr = 0.1;
        c.optim.linear_scaling = true;
        c.optim.lr_reference_batch = 256;
        c.train.batch_size = 1024;
        close(peak_lr(&c.optim, c.train.batch_size, 1), 0.4);
        // Data-parallel: batch_size is per process, the scaling uses the global batch.
        close(peak_lr(&c.optim, c.train.batch_size, 4), 1.6);
        c.optim.linear_scaling = false;
        close(peak_lr(&c.optim, c.train.batch_size, 4), 0.1);
    }

    #[test]
    fn warmup_then_cosine() {
        // 10 iters/epoch, 4 warmup epochs = W 40, 120 epochs = 1200 iters, T = 1160.
        let s = LrSchedule::new(&optim(Schedule::Cosine, 4.0), 0.4, 10, 120);
        close(s.lr_at(0), 0.0);
        close(s.lr_at(10), 0.4 * 10.0 / 40.0); // 0.1
        close(s.lr_at(20), 0.2);
        close(s.lr_at(39), 0.4 * 39.0 / 40.0);
        close(s.lr_at(40), 0.4); // first iteration after warmup is the peak
        close(s.lr_at(40 + 580), 0.2); // t = T/2
        close(s.lr_at(40 + 290), 0.5 * (1.0 + 0.5f64.sqrt()) * 0.4); // t = T/4
        close(s.lr_at(40 + 870), 0.5 * (1.0 - 0.5f64.sqrt()) * 0.4); // t = 3T/4
        let last = s.lr_at(1199); // t = T - 1
        close(
            last,
            0.5 * (1.0 - (std::f64::consts::PI / 1160.0).cos()) * 0.4,
        );
        assert!(last > 0.0 && last < 1e-5, "{last}");
        // Warmup with a non-zero start lr.
        let mut o = optim(Schedule::Cosine, 2.0);
        o.warmup_start_lr = 0.1;
        let s = LrSchedule::new(&o, 0.5, 10, 10);
        close(s.lr_at(0), 0.1);
        close(s.lr_at(5), 0.1 + 0.4 * 5.0 / 20.0);
        close(s.lr_at(20), 0.5);
    }

    #[test]
    fn cosine_without_warmup() {
        let s = LrSchedule::new(&optim(Schedule::Cosine, 0.0), 0.1, 4, 10);
        close(s.lr_at(0), 0.1);
        close(s.lr_at(20), 0.05);
        close(
            s.lr_at(10),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()) * 0.1,
        );
    }

    #[test]
    fn warmup_then_step() {
        // Paper batch 1024: base 0.1 scaled to 0.4; 100 iters/epoch, 5 warmup epochs.
        let mut c = Config {
            optim: optim(Schedule::Step, 5.0),
            ..Config::default()
        };
        c.optim.linear_scaling = true;
        c.train.batch_size = 1024;
        let s = LrSchedule::new(&c.optim, peak_lr(&c.optim, c.train.batch_size, 1), 100, 120);
        close(s.lr_at(0), 0.0);
        close(s.lr_at(250), 0.2);
        close(s.lr_at(500), 0.4);
        close(s.lr_at(2999), 0.4); // epoch 29
        close(s.lr_at(3000), 0.04); // epoch 30: first drop
        close(s.lr_at(5999), 0.04);
        close(s.lr_at(6000), 0.004);
        close(s.lr_at(9000), 0.0004);
        close(s.lr_at(11999), 0.0004);
    }

    #[test]
    fn fractional_warmup_rounds() {
        // 0.25 epochs of 10 iterations = round(2.5) = 3 warmup iterations.
        let s = LrSchedule::new(&optim(Schedule::Step, 0.25), 0.3, 10, 2);
        close(s.lr_at(1), 0.1);
        close(s.lr_at(2), 0.2);
        close(s.lr_at(3), 0.3);
    }
}
