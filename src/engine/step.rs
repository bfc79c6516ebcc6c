//! One optimisation step on a computed loss, for every task, and the epoch's running sums of
//! what the steps report.

use crate::checkpoint;
use crate::train::clip;
use crate::train::optim::Optimizer;
use crate::train::precision::LossScaler;
use crate::train::DataParallel;
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where a step sits in the run (for error messages).
#[derive(Debug, Clone, Copy)]
pub struct StepPosition {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub global_step: usize,
}

/// What [`optimizer_step`] reports.
pub(crate) struct StepOutcome {
    /// This process's loss, detached, on the device (not read back).
    pub loss: Tensor,
    /// Stop after this step: a stop was requested here or, in a data-parallel run, on any rank.
    pub stop: bool,
}

/// One optimisation step on a computed loss, shared by every task: stop on a non-finite loss
/// (naming the step and the last good checkpoint), backward through the loss scaler (averaging
/// gradients over ranks in a data-parallel run), skip the step on inf/NaN gradients (f16), clip,
/// SGD step. Data-parallel ranks agree first on the loss being finite and on stopping, so that
/// they all take, or all refuse, the same step.
///
/// `check_loss = false` skips reading the loss back before the step (single process only): on a
/// GPU that read makes the host wait for the queue to drain at every step, so the classification
/// trainer reads its summed loss every few steps instead and stops there ([`EpochSums`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimizer_step(
    loss: &Tensor,
    opt: &mut Optimizer,
    scaler: &mut LossScaler,
    optim: &crate::config::OptimConfig,
    lr: f64,
    ckpt_dir: &Path,
    at: StepPosition,
    dp: Option<&DataParallel>,
    stop_requested: bool,
    check_loss: bool,
) -> Result<StepOutcome> {
    let mut stop = stop_requested;
    if check_loss || dp.is_some() {
        let local_loss = f64::try_from(loss)?;
        let loss_value = match dp {
            Some(dp) => {
                let v = dp.sum(&[local_loss, f64::from(u8::from(stop_requested))])?;
                stop = v[1] > 0.0;
                v[0] / dp.world_size() as f64
            }
            None => local_loss,
        };
        if !loss_value.is_finite() && !scaler.enabled {
            let place = format!(
                "at epoch {}, step {} (global step {})",
                at.epoch,
                at.step_in_epoch + 1,
                at.global_step + 1
            );
            return Err(non_finite_loss(loss_value, &place, ckpt_dir));
        }
    }
    opt.zero_grad();
    if let Some(dp) = dp {
        dp.before_backward()?;
    }
    scaler.scale_loss(loss).f_backward().map_err(|e| {
        let msg = format!(
            "the backward pass failed at epoch {}, step {}: {e}",
            at.epoch,
            at.step_in_epoch + 1
        );
        match dp {
            // The gradient all-reduce runs inside the backward pass.
            Some(_) => anyhow!("{msg} (another rank has probably stopped or died: see its output)"),
            None => anyhow!(msg),
        }
    })?;
    let grads = opt.gradients();
    // With f16 loss scaling, 1 on the device where a gradient is inf or NaN: the step is skipped
    // there (clipping such gradients makes NaNs, which the skipped step never reads).
    let found_inf = scaler.unscale(&grads);
    if optim.clip_grad_value > 0.0 {
        clip::clip_grad_value(&grads, optim.clip_grad_value);
    }
    if optim.clip_grad_norm > 0.0 {
        let _ = clip::clip_grad_norm(&grads, optim.clip_grad_norm);
    }
    opt.step_unless(lr, found_inf.as_ref());
    if let Some(found_inf) = &found_inf {
        scaler.update(found_inf);
    }
    Ok(StepOutcome {
        loss: loss.detach(),
        stop,
    })
}

/// The error for a NaN or infinite training loss, naming where it was seen and the checkpoint to
/// go back to.
fn non_finite_loss(value: f64, place: &str, ckpt_dir: &Path) -> anyhow::Error {
    let last = checkpoint::list_epoch_checkpoints(ckpt_dir)
        .first()
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_else(|| "none yet".into());
    anyhow!(
        "the loss became {value} {place}; training stopped, the last good checkpoint is {last} (lower optim.lr, or enable optim.clip_grad_norm)"
    )
}

/// Steps between reads of the running loss on a single GPU: the progress line's refresh, and the
/// most steps a NaN loss (without a loss scaler) goes unnoticed before training stops.
const GPU_READ_EVERY: usize = 25;

/// The training loss and top-1 sums of an epoch. What each step adds stays on the device and is
/// read back every `read_every` steps: a read makes a GPU wait until its queue has drained,
/// which at every step would serialise the host's kernel launches with the GPU's work. On a CPU
/// a read costs nothing and `read_every` is 1.
pub(crate) struct EpochSums {
    pub(crate) loss: f64,
    pub(crate) correct: i64,
    /// The loss's terms, summed like `loss` ([`crate::engine::StepOutput::parts`]).
    pub(crate) parts: Vec<f64>,
    /// Non-finite losses are expected (an f16 loss scaler skips those steps), not an error.
    loss_may_be_inf: bool,
    /// Where the error for a non-finite loss finds the last good checkpoint.
    ckpt_dir: PathBuf,
    pending_loss: Tensor,
    pending_correct: Tensor,
    pending_parts: Vec<Tensor>,
    /// Global steps whose sums are pending: from `pending_from`, `pending_steps` of them.
    pending_from: usize,
    pending_steps: usize,
    read_every: usize,
}

impl EpochSums {
    /// How often the sums are read back: every step on a CPU, where a read is free, and in a
    /// data-parallel run, whose ranks agree on the loss at every step anyway; else every
    /// [`GPU_READ_EVERY`] steps.
    pub(crate) fn read_every(device: Device, data_parallel: bool) -> usize {
        if device.is_cuda() && !data_parallel {
            GPU_READ_EVERY
        } else {
            1
        }
    }

    pub(crate) fn new(
        loss: f64,
        correct: i64,
        parts: Vec<f64>,
        device: Device,
        read_every: usize,
        loss_may_be_inf: bool,
        ckpt_dir: &Path,
    ) -> EpochSums {
        EpochSums {
            loss,
            correct,
            pending_parts: parts
                .iter()
                .map(|_| Tensor::zeros([], (Kind::Double, device)))
                .collect(),
            parts,
            loss_may_be_inf,
            ckpt_dir: ckpt_dir.to_path_buf(),
            pending_loss: Tensor::zeros([], (Kind::Double, device)),
            pending_correct: Tensor::zeros([], (Kind::Int64, device)),
            pending_from: 0,
            pending_steps: 0,
            read_every,
        }
    }

    /// Whether every step is read back: then the optimizer step checks the loss itself, before
    /// applying a NaN step.
    pub(crate) fn reads_every_step(&self) -> bool {
        self.read_every == 1
    }

    /// Adds a step's mean loss (times its batch size) and hits (top-1 hits; correct pixels in
    /// segmentation); returns true when the sums were read back, i.e. the running figures are
    /// current.
    pub(crate) fn add(
        &mut self,
        loss: &Tensor,
        hits: &Tensor,
        parts: &[Tensor],
        batch: i64,
        global_step: usize,
    ) -> Result<bool> {
        if self.pending_steps == 0 {
            self.pending_from = global_step;
        }
        self.pending_loss += loss.to_kind(Kind::Double) * batch as f64;
        self.pending_correct += hits;
        if self.pending_parts.len() < parts.len() {
            let device = self.pending_loss.device();
            self.pending_parts
                .resize_with(parts.len(), || Tensor::zeros([], (Kind::Double, device)));
            self.parts.resize(parts.len(), 0.0);
        }
        for (sum, part) in self.pending_parts.iter_mut().zip(parts) {
            *sum += part.detach().to_kind(Kind::Double) * batch as f64;
        }
        self.pending_steps += 1;
        if self.pending_steps < self.read_every {
            return Ok(false);
        }
        self.read()?;
        Ok(true)
    }

    /// Reads the pending sums back. Without a loss scaler (which skips inf/NaN steps itself) a
    /// non-finite sum stops training, naming the steps it came from.
    pub(crate) fn read(&mut self) -> Result<()> {
        if self.pending_steps == 0 {
            return Ok(());
        }
        let loss = f64::try_from(&self.pending_loss)?;
        if !loss.is_finite() && !self.loss_may_be_inf {
            let (a, b) = (
                self.pending_from + 1,
                self.pending_from + self.pending_steps,
            );
            let place = if a == b {
                format!("at global step {a}")
            } else {
                format!("within global steps {a}–{b}")
            };
            return Err(non_finite_loss(loss, &place, &self.ckpt_dir));
        }
        self.loss += loss;
        self.correct += self.pending_correct.int64_value(&[]);
        for (sum, pending) in self.parts.iter_mut().zip(&mut self.pending_parts) {
            *sum += f64::try_from(&*pending)?;
            let _ = pending.zero_();
        }
        let _ = self.pending_loss.zero_();
        let _ = self.pending_correct.zero_();
        self.pending_steps = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn scalar(v: f32) -> Tensor {
        Tensor::from(v)
    }

    /// The trainer's step with f16 loss scaling (in f32 here: the scaler does not care): a
    /// finite step moves the weights by the unscaled gradient; an infinite loss is skipped on the
    /// device, leaving weights and momentum as they were, and halves the scale.
    #[test]
    fn loss_scaled_steps_unscale_and_skip_infinite_ones() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0]));
        let optim = crate::config::OptimConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, &optim);
        opt.flatten();
        let mut scaler = LossScaler::new(true, Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        let step =
            |opt: &mut Optimizer, scaler: &mut LossScaler, loss: Tensor, global_step: usize| {
                let at = StepPosition {
                    epoch: 1,
                    step_in_epoch: global_step,
                    global_step,
                };
                optimizer_step(
                    &loss,
                    opt,
                    scaler,
                    &optim,
                    0.1,
                    dir.path(),
                    at,
                    None,
                    false,
                    false,
                )
                .unwrap()
            };
        // d(w·w)/dw = 2w; first step of momentum: b = g, w -= 0.1·g.
        step(&mut opt, &mut scaler, (&w * &w).sum(Kind::Float), 0);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![0.8, 1.6]);
        let momentum = opt.state_tensors()[0].1.copy();
        let infinite = (&w * f64::INFINITY).sum(Kind::Float);
        let outcome = step(&mut opt, &mut scaler, infinite, 1);
        assert!(f64::try_from(&outcome.loss).unwrap().is_infinite());
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![0.8, 1.6]);
        assert!(opt.state_tensors()[0].1.equal(&momentum));
        assert_eq!(scaler.scale(), 32768.0);
        assert_eq!(scaler.good_steps(), 0);
    }

    #[test]
    fn epoch_sums_are_read_every_n_steps_and_carry_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EpochSums::new(10.0, 7, Vec::new(), Device::Cpu, 3, false, dir.path());
        let hits = Tensor::from(2i64);
        assert!(!s.add(&scalar(1.5), &hits, &[], 4, 0).unwrap());
        assert!(!s.add(&scalar(0.5), &hits, &[], 4, 1).unwrap());
        // Nothing read yet: the running figures are still those carried in.
        assert_eq!((s.loss, s.correct), (10.0, 7));
        assert!(s.add(&scalar(1.0), &hits, &[], 2, 2).unwrap());
        assert_eq!((s.loss, s.correct), (10.0 + 6.0 + 2.0 + 2.0, 7 + 6));
        // A partial window is read at the epoch's end.
        assert!(!s.add(&scalar(0.25), &hits, &[], 4, 3).unwrap());
        s.read().unwrap();
        assert_eq!((s.loss, s.correct), (21.0, 15));
        s.read().unwrap(); // nothing pending: unchanged
        assert_eq!((s.loss, s.correct), (21.0, 15));
    }

    #[test]
    fn a_non_finite_loss_is_an_error_naming_its_steps_unless_a_scaler_skips_them() {
        let dir = tempfile::tempdir().unwrap();
        let hits = Tensor::from(0i64);
        let mut s = EpochSums::new(0.0, 0, Vec::new(), Device::Cpu, 4, false, dir.path());
        for (step, v) in [(10, 1.0), (11, f32::NAN), (12, 1.0)] {
            assert!(!s.add(&scalar(v), &hits, &[], 2, step).unwrap());
        }
        let e = s
            .add(&scalar(1.0), &hits, &[], 2, 13)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loss became NaN within global steps 11–14"),
            "{e}"
        );
        assert!(e.contains("last good checkpoint is none yet"), "{e}");
        // With f16 loss scaling a NaN step is skipped by the scaler, not fatal.
        let mut s = EpochSums::new(0.0, 0, Vec::new(), Device::Cpu, 1, true, dir.path());
        assert!(s.add(&scalar(f32::INFINITY), &hits, &[], 2, 0).unwrap());
        let e = EpochSums::new(0.0, 0, Vec::new(), Device::Cpu, 1, false, dir.path())
            .add(&scalar(f32::INFINITY), &hits, &[], 2, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss became inf at global step 5"), "{e}");
    }
}
