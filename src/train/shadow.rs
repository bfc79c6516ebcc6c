//! A copy of the model's floating variables (parameters and batch-norm statistics) kept beside
//! the live ones: lookahead's slow weights and the EMA's average. Kept in the live tensors'
//! memory layouts, copied and put back around the untimed warm-up, and saved in checkpoints under
//! a prefix of the optimiser's state.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

pub struct Shadow {
    /// Checkpoint key prefix.
    prefix: &'static str,
    /// What it is, and the key that turns it on, for errors.
    what: &'static str,
    key: &'static str,
    /// Per floating variable of the model: name, the live tensor, and the copy.
    pub(super) slots: Vec<(String, Tensor, Tensor)>,
}

impl Shadow {
    /// A copy of the model's current floating variables, in name order.
    pub fn new(
        vs: &nn::VarStore,
        prefix: &'static str,
        what: &'static str,
        key: &'static str,
    ) -> Shadow {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let slots = vars
            .into_iter()
            .filter(|(_, t)| t.is_floating_point())
            .map(|(name, t)| {
                let copy = tch::no_grad(|| t.detach().copy());
                (name, t, copy)
            })
            .collect();
        Shadow {
            prefix,
            what,
            key,
            slots,
        }
    }

    /// Gives each copy its live tensor's memory layout (after a channels-last conversion), so
    /// that the arithmetic between them runs on dense, matching tensors.
    pub fn match_layouts(&mut self) {
        tch::no_grad(|| {
            for (_, live, copy) in &mut self.slots {
                if live.stride() != copy.stride() {
                    let mut laid_out = live.detach().copy();
                    laid_out.copy_(copy);
                    *copy = laid_out;
                }
            }
        });
    }

    /// Copies of the copies, for [`Shadow::restore`].
    pub fn snapshot(&self) -> Vec<Tensor> {
        tch::no_grad(|| self.slots.iter().map(|(_, _, c)| c.copy()).collect())
    }

    /// Puts back what [`Shadow::snapshot`] took.
    pub fn restore(&mut self, saved: Vec<Tensor>) {
        tch::no_grad(|| {
            for ((_, _, copy), saved) in self.slots.iter_mut().zip(saved) {
                copy.copy_(&saved);
            }
        });
    }

    /// The copies by prefix + variable name, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|(name, _, copy)| (format!("{}{name}", self.prefix), copy.shallow_clone()))
            .collect()
    }

    /// Restores the copies saved by [`Shadow::state_tensors`]; a checkpoint without them is an
    /// error (the run would silently restart its average).
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, _, copy) in &mut self.slots {
            let key = format!("{}{name}", self.prefix);
            let Some(t) = tensors.get(&key) else {
                bail!(
                    "the checkpoint has no {} state `{key}` (was it saved by a run without {}?)",
                    self.what,
                    self.key
                );
            };
            if t.size() != copy.size() {
                bail!(
                    "{} state `{key}` has shape {:?}, the variable has {:?}",
                    self.what,
                    t.size(),
                    copy.size()
                );
            }
            tch::no_grad(|| copy.copy_(t));
        }
        Ok(())
    }
}
