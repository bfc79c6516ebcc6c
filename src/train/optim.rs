//! Nesterov SGD with state this project owns (so momentum buffers go into checkpoints and resume
//! is exact), and per-parameter weight decay for the "no bias decay" trick.

use crate::config::OptimConfig;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

/// One trainable tensor and its optimizer state.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Whether weight decay applies (paper §3.1: with `no_bias_decay`, only conv/linear weights).
    pub decay: bool,
    /// Multiplier of the lr for this tensor (1.0 unless set, e.g. a lower backbone lr).
    pub lr_scale: f64,
    pub(crate) momentum: Option<Tensor>,
}

impl Param {
    pub fn set_lr_scale(&mut self, scale: f64) {
        self.lr_scale = scale;
    }
}

/// SGD with PyTorch's update rule (`torch.optim.SGD`, dampening 0):
/// g ← ∇ + wd·w; b ← μ·b + g (b₀ = g); step = g + μ·b (Nesterov) or b; w ← w − lr·step.
pub struct Sgd {
    pub params: Vec<Param>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
}

/// Whether a parameter is decayed: with `no_bias_decay`, biases and BN γ/β (all 1-D tensors) are not.
pub fn decays(tensor: &Tensor, no_bias_decay: bool) -> bool {
    !no_bias_decay || tensor.dim() > 1
}

impl Sgd {
    /// Optimizes every trainable variable of `vs` (those with requires_grad), in name order.
    pub fn new(vs: &nn::VarStore, cfg: &OptimConfig) -> Sgd {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, tensor)| Param {
                decay: decays(&tensor, cfg.no_bias_decay),
                name,
                tensor,
                lr_scale: 1.0,
                momentum: None,
            })
            .collect();
        Sgd {
            params,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
        }
    }

    /// Sets the lr multiplier of every parameter whose name `selects`; returns how many.
    pub fn set_lr_scale(&mut self, selects: impl Fn(&str) -> bool, scale: f64) -> usize {
        let mut n = 0;
        for p in self.params.iter_mut().filter(|p| selects(&p.name)) {
            p.set_lr_scale(scale);
            n += 1;
        }
        n
    }

    pub fn tensors(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.tensor.shallow_clone())
            .collect()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let (mu, wd, nesterov) = (self.momentum, self.weight_decay, self.nesterov);
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let mut g = if p.decay && wd != 0.0 {
                    &grad + &p.tensor * wd
                } else {
                    grad
                };
                if mu != 0.0 {
                    let buf = match &mut p.momentum {
                        Some(b) => {
                            let _ = b.g_mul_scalar_(mu).g_add_(&g);
                            b.shallow_clone()
                        }
                        None => {
                            let b = g.detach().copy();
                            p.momentum = Some(b.shallow_clone());
                            b
                        }
                    };
                    g = if nesterov { g + buf * mu } else { buf };
                }
                let _ = p.tensor.g_add_(&(g * (-lr * p.lr_scale)));
            }
        });
    }

    /// Momentum buffers by parameter name, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter_map(|p| {
                p.momentum.as_ref().map(|b| {
                    (
                        format!("{}{}", crate::checkpoint::MOMENTUM_PREFIX, p.name),
                        b.shallow_clone(),
                    )
                })
            })
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::state_tensors`].
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for p in &mut self.params {
            let key = format!("{}{}", crate::checkpoint::MOMENTUM_PREFIX, p.name);
            if let Some(t) = tensors.get(&key) {
                if t.size() != p.tensor.size() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                        t.size(),
                        p.tensor.size()
                    );
                }
                p.momentum = Some(
                    t.to_kind(p.tensor.kind())
                        .to_device(p.tensor.device())
                        .contiguous(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimConfig;
    use tch::{Device, Kind};

    fn store() -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = nn::conv2d(
            &root / "conv",
            2,
            3,
            3,
            nn::ConvConfig {
                bias: false,
                ..Default::default()
            },
        );
        let _ = nn::linear(&root / "fc", 4, 2, Default::default());
        let _ = nn::batch_norm2d(&root / "bn", 3, Default::default());
        vs
    }

    fn set_grads(vs: &nn::VarStore, scale: f64) {
        let loss = vs
            .trainable_variables()
            .iter()
            .map(|t| (t * t).sum(Kind::Float) * (scale / 2.0))
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
        loss.backward();
    }

    fn snapshot(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect()
    }

    #[test]
    fn no_bias_decay_leaves_biases_and_bn_alone_and_decays_weights_by_hand_formula() {
        tch::manual_seed(3);
        let vs = store();
        // Make BN γ/β non-trivial so "unchanged" means something.
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                if v.requires_grad() {
                    v.copy_(&Tensor::randn(v.size(), (Kind::Float, Device::Cpu)));
                }
            }
        });
        let cfg = OptimConfig {
            no_bias_decay: true,
            weight_decay: 1e-2,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        let mut opt = Sgd::new(&vs, &cfg);
        let before = snapshot(&vs);
        set_grads(&vs, 0.0); // zero gradients, but defined
        let lr = 0.5;
        opt.step(lr);
        let after = snapshot(&vs);
        for (name, w0) in &before {
            let w1 = &after[name];
            if name.ends_with("bias") || name.starts_with("bn.") {
                assert!(w1.equal(w0), "{name} changed");
            } else {
                // Nesterov first step: g = wd·w, b = g, step = g + μ·b = (1 + μ)·wd·w.
                let expected = w0 - w0 * (lr * (1.0 + 0.9) * 1e-2);
                assert!(w1.allclose(&expected, 1e-6, 1e-7, false), "{name}");
            }
        }
        // With the trick off, biases decay too.
        let vs2 = store();
        let mut opt2 = Sgd::new(
            &vs2,
            &OptimConfig {
                weight_decay: 1e-2,
                ..Default::default()
            },
        );
        assert!(opt2.params.iter().all(|p| p.decay));
        let b0 = vs2.variables()["fc.bias"].detach().copy();
        tch::no_grad(|| {
            let _ = vs2.variables()["fc.bias"].shallow_clone().fill_(1.0);
        });
        set_grads(&vs2, 0.0);
        opt2.step(1.0);
        let _ = b0;
        let b1 = f64::try_from(vs2.variables()["fc.bias"].mean(Kind::Float)).unwrap();
        assert!((b1 - (1.0 - 1.9e-2)).abs() < 1e-6, "{b1}");
    }

    #[test]
    fn nesterov_update_matches_pytorch_rule_over_two_steps() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0]));
        let cfg = OptimConfig {
            weight_decay: 0.1,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        let mut opt = Sgd::new(&vs, &cfg);
        // loss = 3·sum(w) → grad 3.
        let (lr, mu, wd) = (0.1, 0.9, 0.1);
        let mut w_ref = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        for step in 0..2 {
            opt.zero_grad();
            (w.sum(Kind::Float) * 3.0).backward();
            opt.step(lr);
            for i in 0..2 {
                let g = 3.0 + wd * w_ref[i];
                buf[i] = if step == 0 { g } else { mu * buf[i] + g };
                w_ref[i] -= lr * (g + mu * buf[i]);
            }
        }
        let got: Vec<f32> = Vec::try_from(&w).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - w_ref[i]).abs() < 1e-5,
                "{got:?} vs {w_ref:?}"
            );
        }
        // State round-trips through the checkpoint representation.
        let state: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut fresh = Sgd::new(&vs, &cfg);
        fresh.load_state(&state).unwrap();
        assert!(fresh.params[0]
            .momentum
            .as_ref()
            .unwrap()
            .equal(opt.params[0].momentum.as_ref().unwrap()));
    }
}
