//! Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back") in
//! airbench94's form (`optim.lookahead`): the fast weights are SGD's; every `k` steps the slow
//! weights move towards them, ŵ ← d·ŵ + (1 − d)·w, and the fast weights restart from there,
//! w ← ŵ. The decay grows over the run, d = `lookahead_decay`^k × (t/T)³ at step t of T: the
//! average does nothing early on, when the weights move fast, and smooths the end of the run,
//! which ends on the slow weights. Batch-norm statistics are averaged with the weights they
//! belong to.

use super::shadow::Shadow;
use crate::config::OptimConfig;
use anyhow::Result;
use std::collections::BTreeMap;
use tch::{nn, Tensor};

/// Checkpoint key prefix of the slow weights.
pub const PREFIX: &str = "optim.lookahead.";

pub struct Lookahead {
    every: usize,
    decay: f64,
    total_steps: usize,
    /// The slow weights beside the live variables (parameters and BN statistics).
    slow: Shadow,
}

impl Lookahead {
    /// Slow weights starting at the model's current ones, for a run of `total_steps` steps.
    pub fn new(vs: &nn::VarStore, cfg: &OptimConfig, total_steps: usize) -> Lookahead {
        Lookahead {
            every: cfg.lookahead_every.max(1),
            decay: cfg.lookahead_decay,
            total_steps: total_steps.max(1),
            slow: Shadow::new(vs, PREFIX, "lookahead", "optim.lookahead"),
        }
    }

    /// Slow weights restart at the model's current ones: for weights set after the lookahead
    /// was made (airbench94's whitening init, which a resumed run skips).
    pub fn restart_from_model(&mut self) {
        tch::no_grad(|| {
            for (_, live, slow) in &mut self.slow.slots {
                slow.copy_(live);
            }
        });
    }

    /// Gives each slow copy its live tensor's memory layout (after a channels-last conversion).
    pub fn match_layouts(&mut self) {
        self.slow.match_layouts();
    }

    /// The decay used after `steps_done` steps.
    pub fn decay_at(&self, steps_done: usize) -> f64 {
        let progress = steps_done.min(self.total_steps) as f64 / self.total_steps as f64;
        self.decay.powi(self.every as i32) * progress.powi(3)
    }

    /// Call after every optimiser step with the number of steps done so far: every `every`
    /// steps, the slow weights take their step and the model restarts from them; after the
    /// run's last step, the model takes the slow weights ([`Lookahead::finish`]).
    pub fn after_step(&mut self, steps_done: usize) {
        if steps_done.is_multiple_of(self.every) {
            let d = self.decay_at(steps_done);
            self.average(Some(1.0 - d));
        }
        if steps_done == self.total_steps {
            self.finish();
        }
    }

    /// The end of the run: the model takes the slow weights.
    pub fn finish(&mut self) {
        self.average(None);
    }

    /// `slow ← slow + weight·(live − slow)` (skipped without a weight), then `live ← slow`, for
    /// every variable: two multi-tensor operations through csrc/shim.cpp (two per variable, each
    /// a kernel launch on a GPU, tensor by tensor), or tensor by tensor should they fail.
    fn average(&mut self, weight: Option<f64>) {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let slow: Vec<_> = self.slow.slots.iter().map(|(_, _, s)| ptr(s)).collect();
        let live: Vec<_> = self.slow.slots.iter().map(|(_, l, _)| ptr(l)).collect();
        // SAFETY: the pointers are live tensors of `self.slow`, unchanged during the call.
        let err = unsafe {
            crate::ffi::tricks_lookahead_step(
                slow.as_ptr(),
                live.as_ptr(),
                slow.len() as i64,
                weight.unwrap_or(0.0),
                weight.is_none(),
            )
        };
        let Some(msg) = crate::ffi::take_error(err) else {
            return;
        };
        // The tensors are dense, of one dtype, on one device: a failure is a bug, not bad input.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            eprintln!(
                "warning: lookahead's multi-tensor step failed ({msg}); going tensor by tensor"
            )
        });
        tch::no_grad(|| {
            for (_, live, slow) in &mut self.slow.slots {
                if let Some(w) = weight {
                    let _ = slow.lerp_(live, w);
                }
                live.copy_(slow);
            }
        });
    }

    /// Copies of the slow weights, for [`Lookahead::restore`].
    pub fn snapshot(&self) -> Vec<Tensor> {
        self.slow.snapshot()
    }

    /// Puts back the slow weights of [`Lookahead::snapshot`].
    pub fn restore(&mut self, saved: Vec<Tensor>) {
        self.slow.restore(saved);
    }

    /// One averaging step with the first step's decay, whatever the step count: what
    /// `train.untimed_warmup` runs once (and undoes) so that its kernels are loaded before the
    /// first epoch.
    pub fn warm_up(&mut self) {
        let d = self.decay_at(self.every);
        self.average(Some(1.0 - d));
    }

    /// The slow weights by `PREFIX` + variable name, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slow.state_tensors()
    }

    /// Restores slow weights saved by [`Lookahead::state_tensors`]; a checkpoint without them
    /// is an error (the run would silently restart its average).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.slow.load_state(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lookahead: true,
            lookahead_every: 5,
            lookahead_decay: 0.95,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn slow_weights_follow_airbench94s_decay_and_the_model_restarts_from_them() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut w = vs.root().zeros("w", &[3]);
        let mut m = vs.root().zeros("m", &[2, 2]);
        let total = 100;
        let mut la = Lookahead::new(&vs, &cfg(), total);
        assert!((la.decay_at(50) - 0.95f64.powi(5) * 0.125).abs() < 1e-12);
        assert_eq!(la.decay_at(0), 0.0);
        // Off-cycle steps change nothing.
        tch::no_grad(|| w.copy_(&Tensor::from_slice(&[1.0f32, 2.0, 3.0])));
        tch::no_grad(|| m.copy_(&Tensor::from_slice(&[4.0f32, 5.0, 6.0, 7.0]).view([2, 2])));
        la.after_step(49);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![1.0, 2.0, 3.0]);
        // Step 50: ŵ = d·0 + (1 − d)·w, and w = ŵ, for every variable.
        la.after_step(50);
        let d = la.decay_at(50);
        let got = Vec::<f32>::try_from(&w).unwrap();
        for (g, x) in got.iter().zip([1.0, 2.0, 3.0]) {
            assert!((*g as f64 - (1.0 - d) * x).abs() < 1e-6, "{got:?}");
        }
        let got = Vec::<f32>::try_from(&m.view([-1])).unwrap();
        for (g, x) in got.iter().zip([4.0, 5.0, 6.0, 7.0]) {
            assert!((*g as f64 - (1.0 - d) * x).abs() < 1e-6, "{got:?}");
        }
        // Step 55: ŵ = d·ŵ + (1 − d)·w with the fast weights moved since.
        let slow_m: Vec<f32> = got.clone();
        tch::no_grad(|| m.copy_(&Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0]).view([2, 2])));
        la.after_step(55);
        let d = la.decay_at(55);
        let got = Vec::<f32>::try_from(&m.view([-1])).unwrap();
        for (g, s) in got.iter().zip(&slow_m) {
            let want = d * *s as f64 + (1.0 - d) * 1.0;
            assert!((*g as f64 - want).abs() < 1e-6, "{got:?}");
        }
        // The state round-trips through a checkpoint's tensors.
        let saved: BTreeMap<String, Tensor> = la.state_tensors().into_iter().collect();
        assert!(saved.contains_key("optim.lookahead.w"));
        let vs2 = nn::VarStore::new(Device::Cpu);
        let w2 = vs2.root().zeros("w", &[3]);
        let mut la2 = Lookahead::new(&vs2, &cfg(), total);
        la2.load_state(&saved).unwrap();
        la2.finish();
        assert!(w2.allclose(&w, 0.0, 0.0, false));
        assert!(la2.load_state(&BTreeMap::new()).is_err());
    }

    #[test]
    fn a_restart_takes_weights_set_after_the_lookahead_was_made() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut w = vs.root().zeros("w", &[3]);
        let mut la = Lookahead::new(&vs, &cfg(), 100);
        tch::no_grad(|| w.copy_(&Tensor::from_slice(&[1.0f32, 2.0, 3.0])));
        la.restart_from_model();
        tch::no_grad(|| w.copy_(&Tensor::from_slice(&[9.0f32, 9.0, 9.0])));
        // The run's end takes the slow weights: the restarted ones, not the zeros it began with.
        la.finish();
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![1.0, 2.0, 3.0]);
    }
}
