//! Low-precision training (paper §3.1): autocast (bf16 or f16) around the forward pass, with f32
//! master weights, and a dynamic loss scaler for f16 (tch has no GradScaler).

use crate::config::Precision;
use crate::device::cpu_bf16_supported;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Checks that a precision can run on a device; an error says why not.
pub fn check_supported(precision: Precision, device: Device) -> Result<()> {
    match (precision, device) {
        (Precision::Fp32, _) => Ok(()),
        (_, Device::Cuda(_)) => Ok(()),
        (Precision::Bf16, _) if cpu_bf16_supported() => Ok(()),
        (Precision::Bf16, _) => bail!(
            "key `train.precision`: bf16 on CPU needs a processor with AVX-512-BF16 or AMX (not found in /proc/cpuinfo); use fp32"
        ),
        (Precision::Fp16, _) => bail!("key `train.precision`: fp16 training is CUDA-only; on CPU use bf16 or fp32"),
    }
}

/// Autocast for the lifetime of the guard (the forward pass and the loss); backward runs after it
/// is dropped, as in PyTorch's AMP recipe.
pub struct Autocast {
    device: i32,
    active: bool,
}

impl Autocast {
    pub fn enter(precision: Precision, device: Device) -> Autocast {
        let dev = if device.is_cuda() { 1 } else { 0 };
        let dtype = match precision {
            Precision::Fp32 => {
                return Autocast {
                    device: dev,
                    active: false,
                }
            }
            Precision::Bf16 => 0,
            Precision::Fp16 => 1,
        };
        unsafe {
            crate::ffi::tricks_autocast_increment_nesting();
            crate::ffi::tricks_autocast_set(dev, true, dtype);
        }
        Autocast {
            device: dev,
            active: true,
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        if self.active {
            unsafe {
                crate::ffi::tricks_autocast_set(self.device, false, 0);
                if crate::ffi::tricks_autocast_decrement_nesting() == 0 {
                    crate::ffi::tricks_autocast_clear_cache();
                }
            }
        }
    }
}

/// Dynamic loss scaling as torch.amp.GradScaler: multiply the loss by `scale`, unscale the
/// gradients, skip the step and halve the scale on inf/NaN, double it after `growth_interval`
/// good steps. Nothing is read back per step: the scale, its count of good steps and each step's
/// inf/NaN flag stay on the training device (the scale is updated by `_amp_update_scale_`, the
/// kernel GradScaler uses, and the optimiser skips a step there, [`Optimizer::step_unless`]), so a GPU
/// never waits for the host. GradScaler reads the flag back before each step, which makes the host
/// wait for the GPU's queue to drain every step.
///
/// [`Optimizer::step_unless`]: super::optim::Optimizer::step_unless
#[derive(Debug)]
pub struct LossScaler {
    pub enabled: bool,
    /// 0-dim f32 on the training device.
    scale: Tensor,
    /// 0-dim i32 on the training device: good steps since the scale last changed.
    good_steps: Tensor,
    pub growth_interval: usize,
}

impl LossScaler {
    pub fn new(enabled: bool, device: Device) -> LossScaler {
        LossScaler {
            enabled,
            scale: Tensor::from(if enabled { 65536.0f32 } else { 1.0 }).to_device(device),
            good_steps: Tensor::from(0i32).to_device(device),
            growth_interval: 2000,
        }
    }

    /// Takes the scale and its count of good steps from a checkpoint's training state (a
    /// disabled scaler stays at 1).
    pub fn restore(&mut self, state: &crate::checkpoint::TrainState) {
        let scale = if self.enabled { state.loss_scale } else { 1.0 };
        tch::no_grad(|| {
            let _ = self.scale.fill_(scale);
            let _ = self.good_steps.fill_(state.loss_scale_good_steps as i64);
        });
    }

    /// Records the scale and its count of good steps in the training state for a checkpoint
    /// (two reads from the device).
    pub fn record(&self, state: &mut crate::checkpoint::TrainState) {
        state.loss_scale = self.scale();
        state.loss_scale_good_steps = self.good_steps();
    }

    /// The current scale (a read from the device).
    pub fn scale(&self) -> f64 {
        f64::try_from(&self.scale).unwrap_or(f64::NAN)
    }

    /// Good steps since the scale last changed (a read from the device).
    pub fn good_steps(&self) -> usize {
        i64::try_from(&self.good_steps).unwrap_or(0).max(0) as usize
    }

    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        if self.enabled {
            loss * &self.scale
        } else {
            loss.shallow_clone()
        }
    }

    /// Unscales gradients in place and returns, when enabled, the step's flag on the device: a
    /// 0-dim f32, 1 where some gradient is inf or NaN (the step must be skipped), else 0. `grads`
    /// as [`Optimizer::gradients`](super::optim::Optimizer::gradients) gives them: with the flat buffer, one
    /// tensor (a few launches in all instead of several per parameter).
    pub fn unscale(&self, grads: &[Tensor]) -> Option<Tensor> {
        if !self.enabled {
            return None;
        }
        tch::no_grad(|| {
            let inv = self.scale.reciprocal();
            let mut found_inf = Tensor::zeros([], (Kind::Bool, self.scale.device()));
            for g in grads.iter().filter(|g| g.defined()) {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_(&inv);
                found_inf = found_inf.logical_or(&g.isfinite().all().logical_not());
            }
            Some(found_inf.to_kind(Kind::Float))
        })
    }

    /// Updates the scale after a step, on the device; `found_inf` is [`LossScaler::unscale`]'s
    /// flag (the step was skipped where it is 1).
    pub fn update(&mut self, found_inf: &Tensor) {
        if !self.enabled {
            return;
        }
        tch::no_grad(|| {
            let _ = self.scale.internal_amp_update_scale_(
                &self.good_steps,
                found_inf,
                2.0,
                0.5,
                self.growth_interval as i64,
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn loss_scaler_skips_inf_steps_halves_and_grows() {
        let mut s = LossScaler::new(true, Device::Cpu);
        s.growth_interval = 3;
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let loss = (&w * &w).sum(Kind::Float);
        s.scale_loss(&loss).backward();
        // grad = 2w·scale before unscaling.
        let found_inf = s.unscale(&[w.grad()]).unwrap();
        assert_eq!(f64::try_from(&found_inf).unwrap(), 0.0);
        let g: Vec<f32> = Vec::try_from(w.grad()).unwrap();
        assert_eq!(g, vec![2.0, 4.0]);
        s.update(&found_inf);
        assert_eq!(s.good_steps(), 1);
        // An inf gradient (or a NaN one): the step must be skipped and the scale halved.
        for bad in [f64::INFINITY, f64::NAN] {
            tch::no_grad(|| {
                let _ = w.grad().fill_(1.0);
                let _ = w.grad().narrow(0, 1, 1).fill_(bad);
            });
            let found_inf = s.unscale(&[w.grad(), Tensor::new()]).unwrap();
            assert_eq!(f64::try_from(&found_inf).unwrap(), 1.0, "{bad}");
            s.update(&found_inf);
        }
        assert_eq!(s.scale(), 16384.0);
        assert_eq!(s.good_steps(), 0);
        let good = Tensor::from(0.0f32);
        for _ in 0..3 {
            s.update(&good);
        }
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.good_steps(), 0);
        // Saved and restored through the training state.
        let mut state = crate::checkpoint::TrainState::default();
        s.update(&good);
        s.record(&mut state);
        let mut t = LossScaler::new(true, Device::Cpu);
        t.restore(&state);
        assert_eq!((t.scale(), t.good_steps()), (32768.0, 1));
    }

    #[test]
    fn disabled_scaler_is_identity() {
        let s = LossScaler::new(false, Device::Cpu);
        let l = Tensor::from(3.0f32);
        assert_eq!(f64::try_from(s.scale_loss(&l)).unwrap(), 3.0);
        assert!(s.unscale(&[l]).is_none());
    }

    #[test]
    fn cpu_bf16_autocast_runs_matmul_in_bf16_and_restores() {
        if !cpu_bf16_supported() {
            assert!(check_supported(Precision::Bf16, Device::Cpu).is_err());
            return;
        }
        let a = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
        {
            let _g = Autocast::enter(Precision::Bf16, Device::Cpu);
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        }
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        assert!(check_supported(Precision::Fp16, Device::Cpu).is_err());
    }
}
