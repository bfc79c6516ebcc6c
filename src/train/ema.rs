//! Model EMA (`ema.decay`): an exponential moving average of the weights, as timm's `ModelEmaV3`
//! keeps it (`timm/utils/model_ema.py`): after every `ema.every` optimiser steps, every floating
//! variable of the model (parameters and batch-norm statistics) moves towards the live one,
//! `ema ← ema + (1 − d)·(live − ema)`, with the decay warmed up over the first updates,
//! `d = min(decay, 1 − (1 + u/γ)^(−p))` at update `u` (timm's `use_warmup`; 0 at the first
//! update, so the average starts at the live weights). The engine evaluates the average beside
//! the live weights each epoch, saves it with the optimiser state and restores it on resume.

use super::shadow::Shadow;
use crate::config::EmaConfig;
use anyhow::Result;
use std::collections::BTreeMap;
use tch::{nn, Tensor};

/// Checkpoint key prefix of the averaged weights (an optimiser-state prefix: a checkpoint's
/// model tensors stay the live weights).
pub const PREFIX: &str = "optim.ema.";

pub struct Ema {
    cfg: EmaConfig,
    /// The average beside the live variables.
    avg: Shadow,
    /// Whether the average is in the model's tensors now ([`Ema::swap`]).
    swapped: bool,
}

impl Ema {
    /// An average starting at the model's current weights.
    pub fn new(vs: &nn::VarStore, cfg: &EmaConfig) -> Ema {
        Ema {
            cfg: cfg.clone(),
            avg: Shadow::new(vs, PREFIX, "EMA", "ema.decay"),
            swapped: false,
        }
    }

    /// The decay of update number `update` (1 for the first), timm's `ModelEmaV3.get_decay`
    /// with `update_after_step = 0`.
    pub fn decay_at(&self, update: usize) -> f64 {
        let step = update.saturating_sub(1);
        if step == 0 {
            return 0.0;
        }
        if !self.cfg.warmup {
            return self.cfg.decay;
        }
        let warm = 1.0 - (1.0 + step as f64 / self.cfg.warmup_gamma).powf(-self.cfg.warmup_power);
        warm.min(self.cfg.decay).max(0.0)
    }

    /// Call after every optimiser step with the number of steps done so far: every `ema.every`
    /// steps the average takes its update.
    pub fn after_step(&mut self, steps_done: usize) {
        let every = self.cfg.every.max(1);
        if steps_done.is_multiple_of(every) {
            let d = self.decay_at(steps_done / every);
            self.update(d);
        }
    }

    /// `ema ← ema + (1 − decay)·(live − ema)` for every variable (timm's `_foreach_lerp_`).
    pub fn update(&mut self, decay: f64) {
        debug_assert!(
            !self.swapped,
            "EMA update while the average is in the model"
        );
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.avg.slots {
                let _ = avg.lerp_(live, 1.0 - decay);
            }
        });
    }

    /// Exchanges the model's weights and the average: the model then holds the average (to
    /// evaluate or save it); a second call puts the live weights back. Exact (copies).
    pub fn swap(&mut self) {
        tch::no_grad(|| {
            for (_, live, avg) in &mut self.avg.slots {
                let held = live.copy();
                live.copy_(avg);
                avg.copy_(&held);
            }
        });
        self.swapped = !self.swapped;
    }

    /// Gives each average its live tensor's memory layout (after a channels-last conversion).
    pub fn match_layouts(&mut self) {
        self.avg.match_layouts();
    }

    /// Copies of the average, for [`Ema::restore`].
    pub fn snapshot(&self) -> Vec<Tensor> {
        self.avg.snapshot()
    }

    /// Puts back the average of [`Ema::snapshot`].
    pub fn restore(&mut self, saved: Vec<Tensor>) {
        self.avg.restore(saved);
    }

    /// The average by `PREFIX` + variable name, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.avg.state_tensors()
    }

    /// Restores the average saved by [`Ema::state_tensors`] (its absence is an error).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.avg.load_state(tensors)
    }
}
