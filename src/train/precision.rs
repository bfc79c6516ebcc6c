//! Low-precision training (paper §3.1): autocast (bf16 or f16) around the forward pass, with f32
//! master weights, and a dynamic loss scaler for f16 (tch has no GradScaler).

use crate::config::Precision;
use anyhow::{bail, Result};
use tch::{Device, Tensor};

/// Whether this CPU has native bf16 units (AVX-512-BF16 or AMX), which make CPU autocast pay off.
pub fn cpu_bf16_supported() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.contains("avx512_bf16") || l.contains("amx_bf16"))
        })
        .unwrap_or(false)
}

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

/// Dynamic loss scaling as torch.cuda.amp.GradScaler: multiply the loss by `scale`, unscale the
/// gradients, skip the step and halve the scale on inf/NaN, double it after `growth_interval`
/// good steps.
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub good_steps: usize,
    pub growth_interval: usize,
}

impl LossScaler {
    /// Takes the scale and its count of good steps from a checkpoint's training state (a
    /// disabled scaler stays at 1).
    pub fn restore(&mut self, state: &crate::checkpoint::TrainState) {
        self.scale = if self.enabled { state.loss_scale } else { 1.0 };
        self.good_steps = state.loss_scale_good_steps;
    }

    /// Records the scale and its count of good steps in the training state for a checkpoint.
    pub fn record(&self, state: &mut crate::checkpoint::TrainState) {
        state.loss_scale = self.scale;
        state.loss_scale_good_steps = self.good_steps;
    }

    pub fn new(enabled: bool) -> LossScaler {
        LossScaler {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            good_steps: 0,
            growth_interval: 2000,
        }
    }

    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        if self.enabled {
            loss * self.scale
        } else {
            loss.shallow_clone()
        }
    }

    /// Unscales gradients in place and returns whether they are all finite (the step may be
    /// taken). `grads` as [`Sgd::gradients`](super::optim::Sgd::gradients) gives them: with the
    /// flat buffer, one tensor (three launches in all instead of four per parameter).
    pub fn unscale(&self, grads: &[Tensor]) -> bool {
        if !self.enabled {
            return true;
        }
        let inv = 1.0 / self.scale;
        tch::no_grad(|| {
            // One read for all gradients (not one per tensor, each of which would stall a GPU).
            let mut all_finite: Option<Tensor> = None;
            for g in grads {
                if g.defined() {
                    let mut g = g.shallow_clone();
                    let _ = g.g_mul_scalar_(inv);
                    let f = g.isfinite().all();
                    all_finite = Some(match all_finite {
                        None => f,
                        Some(a) => a.logical_and(&f),
                    });
                }
            }
            all_finite.is_none_or(|f| bool::try_from(&f).unwrap_or(false))
        })
    }

    /// Updates the scale after a step; `found_inf` means the step was skipped.
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= 0.5;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn loss_scaler_skips_inf_steps_halves_and_grows() {
        let mut s = LossScaler::new(true);
        s.growth_interval = 3;
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let loss = (&w * &w).sum(Kind::Float);
        s.scale_loss(&loss).backward();
        // grad = 2w·scale before unscaling.
        assert!(s.unscale(&[w.grad()]));
        let g: Vec<f32> = Vec::try_from(w.grad()).unwrap();
        assert_eq!(g, vec![2.0, 4.0]);
        s.update(false);
        assert_eq!(s.good_steps, 1);
        // An inf gradient: step must be skipped and the scale halved.
        tch::no_grad(|| {
            let _ = w.grad().fill_(f64::INFINITY);
        });
        assert!(!s.unscale(&[w.grad()]));
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.good_steps, 0);
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!(s.scale, 65536.0);
    }

    #[test]
    fn disabled_scaler_is_identity() {
        let s = LossScaler::new(false);
        let l = Tensor::from(3.0f32);
        assert_eq!(f64::try_from(s.scale_loss(&l)).unwrap(), 3.0);
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
