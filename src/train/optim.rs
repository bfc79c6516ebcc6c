//! The optimisers, with state this project owns (so their buffers go into checkpoints and resume
//! is exact) and per-parameter weight decay for the "no bias decay" trick: the paper's Nesterov
//! SGD (one flat buffer per state, see [`Optimizer::flatten`]), and AdamW (`torch.optim.AdamW`) and
//! LAMB (timm's `Lamb`) of the later recipes, which step tensor by tensor.

use super::ema::Ema;
use super::lookahead::Lookahead;
use crate::config::{OptimConfig, OptimName};
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
    /// Multiplier of the weight decay for this tensor (1.0 unless set: `optim.bn_bias_lr_scale`
    /// divides it by the lr multiplier, so that lr × wd stays the same).
    pub decay_scale: f64,
    /// SGD's momentum buffer, or Adam's first moment.
    pub(crate) momentum: Option<Tensor>,
    /// Adam's second moment (AdamW, LAMB).
    pub(crate) second: Option<Tensor>,
}

/// Checkpoint key prefix of Adam's second moments.
pub const SECOND_MOMENT_PREFIX: &str = "optim.exp_avg_sq.";
/// Checkpoint key of Adam's step count (bias correction).
pub const ADAM_STEPS_KEY: &str = "optim.adam_steps";
/// timm's `Lamb` clips the global gradient norm to this before its moments (`max_grad_norm`).
const LAMB_MAX_GRAD_NORM: f64 = 1.0;

/// The update rule (`optim.name`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Sgd,
    /// AdamW (`lamb: false`) or LAMB: (β1, β2), ε.
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        lamb: bool,
    },
}

impl Param {
    pub fn set_lr_scale(&mut self, scale: f64) {
        self.lr_scale = scale;
    }
}

/// The optimiser of a run, by `optim.name`: SGD with PyTorch's update rule (`torch.optim.SGD`,
/// dampening 0: g ← ∇ + wd·w; b ← μ·b + g (b₀ = g); step = g + μ·b (Nesterov) or b;
/// w ← w − lr·step), on flat buffers after [`Optimizer::flatten`]; or AdamW / LAMB, tensor by
/// tensor. It also holds the state that follows the weights step by step (lookahead's slow
/// weights, the EMA), so that all of it is checkpointed and restored together.
pub struct Optimizer {
    pub params: Vec<Param>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    /// Set by [`Optimizer::flatten`]: every parameter, gradient and momentum buffer is a view of one
    /// buffer each, and a step is a handful of whole-buffer operations.
    flat: Option<Flat>,
    /// `optim.lookahead`: slow weights, saved and restored with the momentum buffers.
    lookahead: Option<Lookahead>,
    /// `ema.decay`: the weights' moving average, saved and restored with the momentum buffers.
    ema: Option<Ema>,
    rule: Rule,
    /// Adam's steps taken (its bias correction), 0 for SGD.
    steps: u64,
}

/// Elements per step of the flat update on a CPU (1 MiB of f32).
const CPU_CHUNK: i64 = 1 << 18;

/// Every tensor in the flat buffers starts at a multiple of this many elements (256 bytes of
/// f32; the CUDA caching allocator aligns its blocks to 512): with parameters that started just
/// anywhere, fp16 training on an H200 faulted with "misaligned address" after a batch norm (bf16
/// and fp32 ran); aligned, it runs.
const FLAT_ALIGN: i64 = 64;

/// The flat buffers (see [`Optimizer::flatten`]).
struct Flat {
    params: Tensor,
    grads: Tensor,
    momentum: Tensor,
    /// Weight decay of each element (0 where a tensor is not decayed), or None when every
    /// element decays by `weight_decay`.
    decay: Option<Tensor>,
    /// Where each parameter starts in the buffers (in `Optimizer::params` order).
    offsets: Vec<i64>,
    /// lr multiplier of each element, or None when all are 1.
    lr_scale: Option<Tensor>,
    /// Elements updated per chunk: all of them on a GPU (fewest launches), [`CPU_CHUNK`] on a
    /// CPU (the chain of element-wise operations then stays in cache).
    chunk: i64,
}

/// The optimiser's state at one moment ([`Optimizer::snapshot`]).
pub struct Snapshot {
    momentum: Vec<Option<Tensor>>,
    second: Vec<Option<Tensor>>,
    steps: u64,
    lookahead: Option<Vec<Tensor>>,
    ema: Option<Vec<Tensor>>,
}

/// Whether a parameter is decayed: with `no_bias_decay`, biases and BN γ/β (all 1-D tensors) are not.
pub fn decays(tensor: &Tensor, no_bias_decay: bool) -> bool {
    !no_bias_decay || tensor.dim() > 1
}

impl Optimizer {
    /// Optimizes every trainable variable of `vs` (those with requires_grad), in name order.
    /// Batch-norm biases (the `bias` of a layer with a `running_mean`) get
    /// `optim.bn_bias_lr_scale` as their lr multiplier and its inverse as their decay multiplier.
    pub fn new(vs: &nn::VarStore, cfg: &OptimConfig) -> Optimizer {
        let all = vs.variables();
        let is_bn_bias = |name: &str| {
            name.strip_suffix("bias")
                .is_some_and(|layer| all.contains_key(&format!("{layer}running_mean")))
        };
        let mut vars: Vec<(String, Tensor)> = all
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, tensor)| {
                let bn_scale = if is_bn_bias(&name) {
                    cfg.bn_bias_lr_scale
                } else {
                    1.0
                };
                Param {
                    decay: decays(&tensor, cfg.no_bias_decay),
                    name,
                    tensor,
                    lr_scale: bn_scale,
                    decay_scale: 1.0 / bn_scale,
                    momentum: None,
                    second: None,
                }
            })
            .collect();
        Optimizer {
            params,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
            flat: None,
            lookahead: None,
            ema: None,
            rule: match cfg.name {
                OptimName::Sgd => Rule::Sgd,
                name => Rule::Adam {
                    beta1: cfg.betas[0],
                    beta2: cfg.betas[1],
                    lamb: name == OptimName::Lamb,
                    eps: cfg
                        .eps
                        .unwrap_or(if name == OptimName::Lamb { 1e-6 } else { 1e-8 }),
                },
            },
            steps: 0,
        }
    }

    /// Moves every parameter, its gradient and its momentum buffer into one flat buffer each
    /// (the parameters keep their shapes and memory layouts, as views), so that a step costs a
    /// few large operations instead of several small ones per tensor: the per-parameter launches
    /// are what make small models slow on a GPU. The update is the same, element by element, with
    /// one difference: a parameter that received no gradient counts as a zero gradient (weight
    /// decay and momentum still move it). Call it once the parameters have their final values and
    /// layouts (after loading, resuming and any channels-last conversion) and after the lr scales
    /// are set; weights loaded later must be copied in place.
    pub fn flatten(&mut self) {
        if let Some(la) = &mut self.lookahead {
            la.match_layouts();
        }
        if let Some(ema) = &mut self.ema {
            ema.match_layouts();
        }
        // AdamW and LAMB step tensor by tensor (LAMB's trust ratio is per tensor).
        if self.rule != Rule::Sgd || self.flat.is_some() || self.params.is_empty() {
            return;
        }
        let first = &self.params[0].tensor;
        let (kind, device) = (first.kind(), first.device());
        if self
            .params
            .iter()
            .any(|p| p.tensor.kind() != kind || p.tensor.device() != device)
        {
            return; // mixed dtypes or devices: keep the per-tensor step
        }
        let padded = |n: i64| (n + FLAT_ALIGN - 1) / FLAT_ALIGN * FLAT_ALIGN;
        let total: i64 = self
            .params
            .iter()
            .map(|p| padded(p.tensor.numel() as i64))
            .sum();
        let opts = (kind, device);
        let params = Tensor::zeros([total], opts);
        let grads = Tensor::zeros([total], opts);
        let momentum = Tensor::zeros([total], opts);
        let uniform_decay = self.params.iter().all(|p| p.decay && p.decay_scale == 1.0);
        let uniform_scale = self.params.iter().all(|p| p.lr_scale == 1.0);
        let mut decay = Vec::new();
        let mut scale = Vec::new();
        let mut offset = 0i64;
        let mut offsets = Vec::new();
        tch::no_grad(|| {
            for p in &mut self.params {
                let n = p.tensor.numel() as i64;
                offsets.push(offset);
                let (size, stride) = (p.tensor.size(), p.tensor.stride());
                let view = |buf: &Tensor| buf.as_strided(&size, &stride, Some(offset));
                let mut pv = view(&params);
                pv.copy_(&p.tensor);
                p.tensor.set_data(&pv);
                let mut gv = view(&grads);
                let g = p.tensor.grad();
                if g.defined() {
                    gv.copy_(&g);
                }
                // SAFETY: both are live tensors; libtorch takes its own reference to `gv`.
                unsafe {
                    crate::ffi::tricks_set_grad(
                        p.tensor.as_mut_ptr() as *mut std::ffi::c_void,
                        gv.as_mut_ptr() as *mut std::ffi::c_void,
                    )
                };
                let mut mv = view(&momentum);
                if let Some(m) = &p.momentum {
                    mv.copy_(m);
                }
                p.momentum = Some(mv);
                // The padding after the tensor stays zero in all three buffers (zero gradient,
                // so weight decay and momentum leave it at zero too).
                let pad = padded(n) - n;
                if !uniform_decay {
                    let wd = self.weight_decay * p.decay_scale;
                    decay.push((n, if p.decay { wd } else { 0.0 }));
                    decay.push((pad, 0.0));
                }
                if !uniform_scale {
                    scale.push((n, p.lr_scale));
                    scale.push((pad, 0.0));
                }
                offset += n + pad;
            }
        });
        let per_element = |runs: &[(i64, f64)]| -> Option<Tensor> {
            if runs.is_empty() {
                return None;
            }
            let parts: Vec<Tensor> = runs
                .iter()
                .map(|&(n, v)| Tensor::full([n], v, opts))
                .collect();
            Some(Tensor::cat(&parts, 0))
        };
        self.flat = Some(Flat {
            params,
            grads,
            momentum,
            decay: per_element(&decay),
            offsets,
            lr_scale: per_element(&scale),
            chunk: if device.is_cuda() { total } else { CPU_CHUNK },
        });
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

    /// Stops updating every parameter whose name `selects` (lr multiplier 0; weight decay and
    /// momentum no longer move it either), also after [`Optimizer::flatten`]; returns how many.
    pub fn freeze(&mut self, selects: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for (i, p) in self.params.iter_mut().enumerate() {
            if !selects(&p.name) || p.lr_scale == 0.0 {
                continue;
            }
            p.lr_scale = 0.0;
            n += 1;
            if let Some(f) = &mut self.flat {
                let len = f.params.numel() as i64;
                let scale = f.lr_scale.get_or_insert_with(|| {
                    Tensor::ones([len], (f.params.kind(), f.params.device()))
                });
                let _ = scale
                    .narrow(0, f.offsets[i], p.tensor.numel() as i64)
                    .fill_(0.0);
            }
        }
        n
    }

    /// The gradients as the step reads them, for in-place work before it (loss unscaling,
    /// clipping): the flat gradient buffer after [`Optimizer::flatten`] (parameters without a gradient
    /// count as zeros there, as in the step), else each parameter's gradient, undefined where a
    /// parameter has none.
    pub fn gradients(&self) -> Vec<Tensor> {
        match &self.flat {
            Some(f) => vec![f.grads.shallow_clone()],
            None => self.params.iter().map(|p| p.tensor.grad()).collect(),
        }
    }

    pub fn zero_grad(&mut self) {
        if let Some(f) = &mut self.flat {
            let _ = f.grads.zero_();
            return;
        }
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone (but see
    /// [`Optimizer::flatten`]).
    pub fn step(&mut self, lr: f64) {
        self.step_unless(lr, None);
    }

    /// [`Optimizer::step`], skipped where `skip` (a 0-dim tensor on the parameters' device, as
    /// [`LossScaler::unscale`](super::precision::LossScaler::unscale) gives it) is non-zero.
    /// With the flat buffers the choice is made on the device, element by element, so the host
    /// does not wait for the flag (the parameters and momentum keep their values where skipped;
    /// where not, they get the very values of `step`); the per-tensor path reads it.
    pub fn step_unless(&mut self, lr: f64, skip: Option<&Tensor>) {
        if let Rule::Adam {
            beta1,
            beta2,
            eps,
            lamb,
        } = self.rule
        {
            if let Some(flag) = skip {
                if f64::try_from(flag).map_or(true, |v| v != 0.0) {
                    return;
                }
            }
            self.adam_step(lr, beta1, beta2, eps, lamb);
            return;
        }
        let (mu, wd, nesterov) = (self.momentum, self.weight_decay, self.nesterov);
        if let (Some(flag), None) = (skip, &self.flat) {
            if f64::try_from(flag).map_or(true, |v| v != 0.0) {
                return;
            }
        }
        if let Some(f) = &mut self.flat {
            let keep = skip.map(|flag| flag.eq(0.0));
            let (total, chunk) = (f.params.numel() as i64, f.chunk);
            tch::no_grad(|| {
                for start in (0..total).step_by(chunk as usize) {
                    let n = chunk.min(total - start);
                    let part = |t: &Tensor| t.narrow(0, start, n);
                    let mut params = part(&f.params);
                    let mut momentum = part(&f.momentum);
                    let grads = part(&f.grads);
                    let mut g = match (&f.decay, wd != 0.0) {
                        (Some(d), true) => &grads + &params * part(d),
                        (None, true) => &grads + &params * wd,
                        (_, false) => grads,
                    };
                    if mu != 0.0 {
                        match &keep {
                            None => {
                                let _ = momentum.g_mul_scalar_(mu).g_add_(&g);
                            }
                            Some(keep) => {
                                let moved = &momentum * mu + &g;
                                momentum.copy_(&moved.where_self(keep, &momentum));
                            }
                        }
                        g = if nesterov {
                            g + &momentum * mu
                        } else {
                            momentum.shallow_clone()
                        };
                    }
                    let update = match &f.lr_scale {
                        Some(s) => g * (part(s) * -lr),
                        None => g * -lr,
                    };
                    match &keep {
                        None => {
                            let _ = params.g_add_(&update);
                        }
                        Some(keep) => params.copy_(&(&params + &update).where_self(keep, &params)),
                    }
                }
            });
            return;
        }
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let mut g = if p.decay && wd != 0.0 {
                    &grad + &p.tensor * (wd * p.decay_scale)
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

    /// Adam's steps taken (AdamW, LAMB), `None` for SGD.
    pub fn adam_steps(&self) -> Option<u64> {
        (self.rule != Rule::Sgd).then_some(self.steps)
    }

    /// Sets Adam's step count (a data-parallel replica takes rank 0's).
    pub fn set_adam_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// One AdamW step as `torch.optim.AdamW` takes it (decoupled weight decay, bias-corrected
    /// moments), or one LAMB step as timm's `Lamb` with its defaults (the global gradient norm
    /// clipped to 1, bias correction, weight decay added to the update, and each tensor's update
    /// scaled by the trust ratio ‖w‖/‖update‖ where it is decayed). Parameters without a
    /// gradient, or frozen (lr multiplier 0), are left alone.
    fn adam_step(&mut self, lr: f64, beta1: f64, beta2: f64, eps: f64, lamb: bool) {
        self.steps += 1;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let wd = self.weight_decay;
        tch::no_grad(|| {
            let active = |p: &Param| p.lr_scale != 0.0 && p.tensor.grad().defined();
            // LAMB: every gradient divided by max(‖g‖ / max_norm, 1), ‖g‖ over all of them.
            let clip = lamb.then(|| {
                let norms: Vec<Tensor> = (self.params.iter())
                    .filter(|p| active(p))
                    .map(|p| p.tensor.grad().to_kind(tch::Kind::Float).norm())
                    .collect();
                let total = Tensor::stack(&norms, 0).norm();
                (total / LAMB_MAX_GRAD_NORM).clamp_min(1.0)
            });
            for p in self.params.iter_mut().filter(|p| active(p)) {
                let grad = match &clip {
                    Some(c) => p.tensor.grad() / c,
                    None => p.tensor.grad(),
                };
                let m = p.momentum.get_or_insert_with(|| p.tensor.zeros_like());
                let v = p.second.get_or_insert_with(|| p.tensor.zeros_like());
                let _ = m.lerp_(&grad, 1.0 - beta1);
                let _ = v
                    .g_mul_scalar_(beta2)
                    .addcmul_(&grad, &grad.g_mul_scalar(1.0 - beta2));
                let denom = v.sqrt() / bc2.sqrt() + eps;
                let plr = lr * p.lr_scale;
                let decay = if p.decay { wd * p.decay_scale } else { 0.0 };
                if !lamb {
                    if decay != 0.0 {
                        let _ = p.tensor.g_mul_scalar_(1.0 - plr * decay);
                    }
                    let _ = p.tensor.addcdiv_(&(&*m * (-plr / bc1)), &denom);
                    continue;
                }
                let mut update = &*m / bc1 / denom;
                if decay != 0.0 {
                    update += &p.tensor * decay;
                    let (w_norm, u_norm) = (p.tensor.norm(), update.norm());
                    let one = w_norm.ones_like();
                    let ratio = (&w_norm / &u_norm)
                        .where_self(&u_norm.gt(0.0), &one)
                        .where_self(&w_norm.gt(0.0), &one);
                    update *= ratio;
                }
                let _ = p.tensor.g_add_(&(update * -plr));
            }
        });
    }

    /// Adds lookahead (`optim.lookahead`) to this optimiser: its slow weights go into
    /// [`Optimizer::state_tensors`] and come back with [`Optimizer::load_state`].
    pub fn set_lookahead(&mut self, lookahead: Lookahead) {
        self.lookahead = Some(lookahead);
    }

    pub fn lookahead_mut(&mut self) -> Option<&mut Lookahead> {
        self.lookahead.as_mut()
    }

    /// Adds the weights' moving average (`ema.decay`): it goes into [`Optimizer::state_tensors`] and
    /// comes back with [`Optimizer::load_state`].
    pub fn set_ema(&mut self, ema: Ema) {
        self.ema = Some(ema);
    }

    pub fn ema_mut(&mut self) -> Option<&mut Ema> {
        self.ema.as_mut()
    }

    /// Copies of the optimiser's state (momentum buffers, lookahead's slow weights), for steps
    /// that must leave no trace: [`Optimizer::restore`] puts it back.
    pub fn snapshot(&self) -> Snapshot {
        tch::no_grad(|| Snapshot {
            momentum: self
                .params
                .iter()
                .map(|p| p.momentum.as_ref().map(Tensor::copy))
                .collect(),
            second: (self.params.iter())
                .map(|p| p.second.as_ref().map(Tensor::copy))
                .collect(),
            steps: self.steps,
            lookahead: self.lookahead.as_ref().map(Lookahead::snapshot),
            ema: self.ema.as_ref().map(Ema::snapshot),
        })
    }

    /// Puts back the state of [`Optimizer::snapshot`]: in place where the buffers are views of the
    /// flat buffer; a buffer that did not exist then (the first step makes it) goes again.
    pub fn restore(&mut self, snapshot: Snapshot) {
        tch::no_grad(|| {
            for (p, saved) in self.params.iter_mut().zip(snapshot.momentum) {
                match (&mut p.momentum, saved) {
                    (Some(live), Some(saved)) => live.copy_(&saved),
                    (live, saved) => *live = saved,
                }
            }
            for (p, saved) in self.params.iter_mut().zip(snapshot.second) {
                p.second = saved;
            }
        });
        self.steps = snapshot.steps;
        if let (Some(la), Some(slow)) = (&mut self.lookahead, snapshot.lookahead) {
            la.restore(slow);
        }
        if let (Some(ema), Some(avg)) = (&mut self.ema, snapshot.ema) {
            ema.restore(avg);
        }
    }

    /// Momentum buffers by parameter name (and lookahead's slow weights), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .params
            .iter()
            .filter_map(|p| {
                p.momentum.as_ref().map(|b| {
                    (
                        format!("{}{}", crate::checkpoint::MOMENTUM_PREFIX, p.name),
                        b.shallow_clone(),
                    )
                })
            })
            .collect();
        for p in &self.params {
            if let Some(s) = &p.second {
                v.push((
                    format!("{SECOND_MOMENT_PREFIX}{}", p.name),
                    s.shallow_clone(),
                ));
            }
        }
        if self.rule != Rule::Sgd {
            v.push((ADAM_STEPS_KEY.to_string(), Tensor::from(self.steps as i64)));
        }
        if let Some(la) = &self.lookahead {
            v.extend(la.state_tensors());
        }
        if let Some(ema) = &self.ema {
            v.extend(ema.state_tensors());
        }
        v
    }

    /// Restores the state saved by [`Optimizer::state_tensors`]: momentum buffers (Adam's first
    /// moments), Adam's second moments and step count, lookahead's and the EMA's weights.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        // The saved tensor of `prefix` + a parameter's name, checked against the parameter and
        // in its dtype and device.
        let saved = |prefix: &str, p: &Param| -> Result<Option<Tensor>> {
            let key = format!("{prefix}{}", p.name);
            let Some(t) = tensors.get(&key) else {
                return Ok(None);
            };
            if t.size() != p.tensor.size() {
                bail!(
                    "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                    t.size(),
                    p.tensor.size()
                );
            }
            Ok(Some(
                t.to_kind(p.tensor.kind()).to_device(p.tensor.device()),
            ))
        };
        let flat = self.flat.is_some();
        for p in &mut self.params {
            if let Some(t) = saved(crate::checkpoint::MOMENTUM_PREFIX, p)? {
                match (&mut p.momentum, flat) {
                    // Flat buffers: the momentum tensors are views, fill them in place.
                    (Some(m), true) => tch::no_grad(|| m.copy_(&t)),
                    _ => p.momentum = Some(t.contiguous()),
                }
            }
            if let Some(t) = saved(SECOND_MOMENT_PREFIX, p)? {
                p.second = Some(t.contiguous());
            }
        }
        if self.rule != Rule::Sgd {
            self.steps = match tensors.get(ADAM_STEPS_KEY) {
                Some(t) => i64::try_from(t)? as u64,
                None if self.params.iter().all(|p| p.momentum.is_none()) => 0,
                None => bail!("the checkpoint has Adam moments but no `{ADAM_STEPS_KEY}`"),
            };
        }
        if let Some(la) = &mut self.lookahead {
            la.load_state(tensors)?;
        }
        if let Some(ema) = &mut self.ema {
            ema.load_state(tensors)?;
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

    /// [`store`] with deterministic values, sin(`freq`·k + i) for element k of the i-th variable
    /// by name: two stores built for one comparison start alike, which libtorch's process-wide
    /// generator does not guarantee (tests running beside draw from it too).
    fn store_with_values(freq: f64) -> nn::VarStore {
        let vs = store();
        tch::no_grad(|| {
            for (i, (_, mut v)) in by_name(&vs).into_iter().enumerate() {
                let n = v.numel() as i64;
                let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * freq + i as f64)
                    .sin()
                    .view(v.size().as_slice());
                v.copy_(&values);
            }
        });
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

    /// The store's variables (shared, not copied) in name order: `variables()` is a hash map,
    /// whose order differs from store to store.
    fn by_name(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
        vs.variables().into_iter().collect()
    }

    fn snapshot(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
        by_name(vs)
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect()
    }

    /// What a run leaves: the weights and the optimizer's state tensors, by name.
    type RunState = (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>);

    fn run_state(vs: &nn::VarStore, opt: &Optimizer) -> RunState {
        (snapshot(vs), opt.state_tensors().into_iter().collect())
    }

    /// Two runs left the same weights and optimizer state, bit for bit (`what` names the case).
    fn assert_same_run(a: &RunState, b: &RunState, what: &str) {
        assert_eq!(a.1.len(), b.1.len(), "{what}: optimizer state tensors");
        for (k, t) in &a.0 {
            assert!(t.equal(&b.0[k]), "{what}: weight {k} differs");
        }
        for (k, t) in &a.1 {
            assert!(t.equal(&b.1[k]), "{what}: state {k} differs");
        }
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
        let mut opt = Optimizer::new(&vs, &cfg);
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
        let mut opt2 = Optimizer::new(
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

    /// The flat-buffer step is the per-tensor step, bit for bit, over several steps with weight
    /// decay on some tensors only, Nesterov momentum, a channels-last conv weight and chunks that
    /// cut across tensors; and the momentum state it saves is the same.
    #[test]
    fn flat_buffers_give_the_per_tensor_update_bit_for_bit() {
        let cfg = OptimConfig {
            no_bias_decay: true,
            weight_decay: 1e-2,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        let run = |flat: bool| {
            let vs = store_with_values(0.37);
            crate::device::weights_to_channels_last(&vs);
            let mut opt = Optimizer::new(&vs, &cfg);
            if flat {
                opt.flatten();
                // Chunks of 7 elements: chunk boundaries fall inside tensors.
                opt.flat.as_mut().unwrap().chunk = 7;
            }
            // Element-wise gradients (grad = c + step·w), so that both runs get bit-identical
            // gradients whatever kernels a layer would pick for differently placed weights.
            for step in 0..3 {
                opt.zero_grad();
                let loss = by_name(&vs)
                    .iter()
                    .filter(|(_, w)| w.requires_grad())
                    .map(|(_, w)| w)
                    .enumerate()
                    .map(|(i, w)| {
                        let c = (Tensor::arange(w.numel() as i64, (Kind::Float, Device::Cpu))
                            * 0.29
                            + i as f64)
                            .cos()
                            .view(w.size().as_slice());
                        (w * c).sum(Kind::Float) + w.square().sum(Kind::Float) * (0.5 * step as f64)
                    })
                    .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
                loss.backward();
                opt.step(0.1);
            }
            run_state(&vs, &opt)
        };
        assert_same_run(&run(false), &run(true), "flat against per-tensor");
    }

    /// `step_unless`: a zero flag gives `step`'s very values, a non-zero one leaves parameters and
    /// momentum untouched, even with inf/NaN gradients (f16 loss scaling's skipped steps), on
    /// both update paths and with lr multipliers.
    #[test]
    fn step_unless_skips_on_the_flag_and_otherwise_equals_step() {
        let cfg = OptimConfig {
            weight_decay: 1e-2,
            momentum: 0.9,
            nesterov: true,
            no_bias_decay: true,
            ..Default::default()
        };
        for flat in [false, true] {
            // Steps with flags (None: plain `step`); gradients poisoned where the flag is set.
            let run = |flags: &[Option<f32>]| {
                let vs = store_with_values(0.37);
                let mut opt = Optimizer::new(&vs, &cfg);
                opt.set_lr_scale(|n| n.ends_with("bias"), 4.0);
                if flat {
                    opt.flatten();
                }
                for (i, flag) in flags.iter().enumerate() {
                    opt.zero_grad();
                    set_grads(&vs, 1.0 + i as f64);
                    if flag == &Some(1.0) {
                        for g in opt.gradients().iter().filter(|g| g.defined()) {
                            let _ = g.shallow_clone().narrow(0, 0, 1).fill_(f64::NAN);
                        }
                    }
                    match flag {
                        None => opt.step(0.1),
                        Some(v) => opt.step_unless(0.1, Some(&Tensor::from(*v))),
                    }
                }
                run_state(&vs, &opt)
            };
            let what = format!("flat {flat}");
            let same = |a: &RunState, b: &RunState| assert_same_run(a, b, &what);
            let plain = run(&[None, None]);
            same(&plain, &run(&[Some(0.0), Some(0.0)]));
            // A skipped first step: as if it never happened (no momentum made, nothing moved)...
            let skipped_first = run(&[Some(1.0)]);
            same(&run(&[]), &skipped_first);
            assert!(skipped_first
                .0
                .values()
                .all(|t| t.isfinite().all().int64_value(&[]) == 1));
            // ...and a skipped step in the middle: the next step continues from the first.
            same(&run(&[None, Some(1.0)]), &run(&[None]));
        }
    }

    /// `restore` undoes every step since `snapshot` on both update paths: the momentum buffers
    /// come back (in place in the flat buffer; the per-tensor path's, made by the first step, go
    /// again), so the next steps are those of an optimiser that never took them.
    #[test]
    fn restore_undoes_the_steps_since_snapshot() {
        let cfg = OptimConfig {
            weight_decay: 1e-2,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        for flat in [false, true] {
            let run = |warm: bool| {
                let vs = store_with_values(0.37);
                let mut opt = Optimizer::new(&vs, &cfg);
                if flat {
                    opt.flatten();
                }
                if warm {
                    let (weights, saved) = (snapshot(&vs), opt.snapshot());
                    for _ in 0..2 {
                        opt.zero_grad();
                        set_grads(&vs, 1.0);
                        opt.step(0.3);
                    }
                    tch::no_grad(|| {
                        for (k, mut v) in by_name(&vs) {
                            v.copy_(&weights[&k]);
                        }
                    });
                    opt.restore(saved);
                }
                for _ in 0..2 {
                    opt.zero_grad();
                    set_grads(&vs, 0.5);
                    opt.step(0.1);
                }
                run_state(&vs, &opt)
            };
            let (reference, restored) = (run(false), run(true));
            assert!(!reference.1.is_empty());
            assert_same_run(&reference, &restored, &format!("flat {flat}"));
        }
    }

    /// Per-tensor lr multipliers (a lower backbone lr) work with flat buffers, and loading
    /// momentum after flattening fills the views in place.
    #[test]
    fn flat_buffers_keep_lr_scales_and_load_momentum_in_place() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().var_copy("a", &Tensor::from_slice(&[1.0f32, 2.0]));
        let b = vs.root().var_copy("b", &Tensor::from_slice(&[3.0f32]));
        let cfg = OptimConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, &cfg);
        assert_eq!(opt.set_lr_scale(|n| n == "a", 0.5), 1);
        opt.flatten();
        opt.zero_grad();
        (a.sum(Kind::Float) + b.sum(Kind::Float)).backward();
        opt.step(1.0);
        // momentum 0.9 (not Nesterov), first step: b = g = 1, w -= lr·scale·b.
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![0.5, 1.5]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![2.0]);
        let mut state: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let key = format!("{}a", crate::checkpoint::MOMENTUM_PREFIX);
        state.insert(key.clone(), Tensor::from_slice(&[7.0f32, 8.0]));
        opt.load_state(&state).unwrap();
        let flat = opt.flat.as_ref().unwrap();
        let m = Vec::<f32>::try_from(&flat.momentum).unwrap();
        let align = FLAT_ALIGN as usize;
        assert_eq!(m.len(), 2 * align);
        assert_eq!((m[0], m[1], m[align]), (7.0, 8.0, 1.0));
        // The padding after each tensor stays zero through steps and loads.
        assert!(m[2..align].iter().chain(&m[align + 1..]).all(|&v| v == 0.0));
    }

    /// Each parameter and gradient view starts at a multiple of FLAT_ALIGN elements into its
    /// buffer (fp16 training on a GPU faulted on misaligned parameters).
    /// `optim.bn_bias_lr_scale`: BN biases (and only they: not the linear bias, not BN γ) step
    /// `s` times further with weight decay `wd/s`, so lr × wd is unchanged; `freeze` stops a
    /// parameter, before or after flattening. Both update paths give the same numbers.
    #[test]
    fn bn_bias_lr_scale_and_freeze_by_hand_formula_on_both_paths() {
        let cfg = OptimConfig {
            weight_decay: 1e-2,
            momentum: 0.0,
            bn_bias_lr_scale: 64.0,
            ..Default::default()
        };
        let mut results = Vec::new();
        for flat in [false, true] {
            let vs = store_with_values(0.7);
            let mut opt = Optimizer::new(&vs, &cfg);
            if flat {
                opt.flatten();
            }
            let before = snapshot(&vs);
            set_grads(&vs, 1.0); // ∇ = w
            let lr = 0.01;
            opt.step(lr);
            let after = snapshot(&vs);
            let expect = |name: &str, scale: f64, wd: f64| {
                let w = &before[name];
                let want = w - (w + w * wd) * (lr * scale);
                assert!(
                    after[name].allclose(&want, 1e-6, 1e-6, false),
                    "{name} (flat {flat})"
                );
            };
            expect("bn.bias", 64.0, 1e-2 / 64.0);
            expect("bn.weight", 1.0, 1e-2);
            expect("fc.bias", 1.0, 1e-2);
            expect("conv.weight", 1.0, 1e-2);
            // Frozen: no further change, whatever the gradient.
            assert_eq!(opt.freeze(|n| n == "fc.bias"), 1);
            assert_eq!(opt.freeze(|n| n == "fc.bias"), 0, "already frozen");
            opt.zero_grad();
            set_grads(&vs, 1.0);
            opt.step(lr);
            let last = snapshot(&vs);
            assert!(last["fc.bias"].equal(&after["fc.bias"]), "flat {flat}");
            assert!(!last["fc.weight"].equal(&after["fc.weight"]));
            results.push(last);
        }
        for (k, v) in &results[0] {
            assert!(v.allclose(&results[1][k], 1e-6, 1e-6, false), "{k}");
        }
    }

    #[test]
    fn flat_buffer_views_start_aligned() {
        let vs = store();
        let mut opt = Optimizer::new(&vs, &OptimConfig::default());
        opt.flatten();
        let flat = opt.flat.as_ref().unwrap();
        let byte_align = FLAT_ALIGN as usize * 4;
        let offset = |t: &Tensor, buf: &Tensor| t.data_ptr() as usize - buf.data_ptr() as usize;
        let mut starts = Vec::new();
        let trainable: Vec<_> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        assert_eq!(trainable.len(), 5);
        for (name, t) in &trainable {
            let (p, g) = (offset(t, &flat.params), offset(&t.grad(), &flat.grads));
            assert_eq!(p % byte_align, 0, "{name} starts at byte {p}");
            assert_eq!(p, g, "{name}: its gradient sits elsewhere");
            starts.push(p);
        }
        starts.sort();
        starts.dedup();
        assert_eq!(
            starts.len(),
            trainable.len(),
            "two parameters share a start"
        );
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
        let mut opt = Optimizer::new(&vs, &cfg);
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
        let mut fresh = Optimizer::new(&vs, &cfg);
        fresh.load_state(&state).unwrap();
        assert!(fresh.params[0]
            .momentum
            .as_ref()
            .unwrap()
            .equal(opt.params[0].momentum.as_ref().unwrap()));
    }
}
