//! Batch norm that can share its statistics across the ranks of a data-parallel run
//! (`distributed.sync_bn`, PyTorch's SyncBatchNorm). Parameter and buffer names are those of
//! `nn::BatchNorm` (weight, bias, running_mean, running_var), so checkpoints do not change.

use crate::distributed;
use std::sync::atomic::{AtomicU8, Ordering};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// `nn::BatchNorm`'s defaults, which every model here uses.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

#[derive(Debug)]
pub struct BatchNorm2d {
    bn: nn::BatchNorm,
    /// The config's ε and momentum (`nn::BatchNorm` keeps its own private), for the fused and
    /// synchronised paths.
    eps: f64,
    momentum: f64,
}

/// A 2-D batch norm starting at γ = `gamma`, β = 0.
pub fn batch_norm2d(p: nn::Path, c: i64, gamma: f64) -> BatchNorm2d {
    batch_norm2d_with(p, c, gamma, EPS, MOMENTUM)
}

/// A 2-D batch norm with its own ε and running-statistics momentum (PyTorch's convention: the
/// weight of the new batch's statistics).
pub fn batch_norm2d_with(p: nn::Path, c: i64, gamma: f64, eps: f64, momentum: f64) -> BatchNorm2d {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(gamma),
        bs_init: nn::Init::Const(0.0),
        eps,
        momentum,
        ..Default::default()
    };
    BatchNorm2d {
        bn: nn::batch_norm2d(p, c, cfg),
        eps,
        momentum,
    }
}

impl BatchNorm2d {
    /// Keeps γ at its value: no gradient, so no optimiser moves it.
    pub fn freeze_weight(&mut self) {
        if let Some(w) = &mut self.bn.ws {
            let _ = w.requires_grad_(false);
        }
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, Epilogue::None)
    }
}

/// Whether the CPU uses the fused kernels (csrc/bn_relu.cpp); `TRICKS_FUSED_BN=0` turns them
/// off (for A/B measurements and as an escape hatch).
fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("TRICKS_FUSED_BN").map_or(true, |v| v != "0");
            set_fused_batch_norm(on);
            on
        }
        v => v == 1,
    }
}

/// 0: not decided yet (read `TRICKS_FUSED_BN`), 1: on, 2: off.
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Turns the fused CPU kernel on or off for the whole process (tests/fused_bn_speed.rs alternates).
pub fn set_fused_batch_norm(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether `x` (4-D) is laid out channels_last and densely: strides `[HWC, 1, WC, C]`.
fn is_channels_last(x: &Tensor) -> bool {
    let (s, st) = (x.size(), x.stride());
    s.len() == 4 && st == [s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]]
}

/// What follows the normalisation inside the fused kernel.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    None,
    Relu,
    /// `relu(bn(x) + residual)`: the end of a residual block.
    AddRelu(&'a Tensor),
    /// Exact GELU (airbench94's network).
    Gelu,
}

impl BatchNorm2d {
    /// `relu(self(x))`. On a channels_last CPU batch, one fused kernel does both.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, Epilogue::Relu)
    }

    /// `gelu(self(x))` (the exact, erf form). On a channels_last CPU batch, one fused kernel does
    /// both.
    pub fn forward_gelu(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, Epilogue::Gelu)
    }

    /// `relu(self(x) + residual)`, the end of a residual block. On channels_last CPU batches of
    /// one dtype, one fused kernel does all three.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, Epilogue::AddRelu(residual))
    }

    /// Batch norm then `epilogue`, by one of three paths: sync-BN's global statistics (training
    /// in a data-parallel run with `distributed.sync_bn`), the fused CPU kernel where it applies,
    /// or libtorch's batch norm; the last two compute the epilogue as separate tensor ops.
    fn forward_with(&self, x: &Tensor, train: bool, epilogue: Epilogue) -> Tensor {
        let normalised = match distributed::sync_bn_group() {
            Some(group) if train => match self.synchronised(x, &group) {
                Ok(y) => y,
                Err(e) => {
                    // forward cannot fail: the trainer picks the error up after the forward pass.
                    distributed::record_sync_bn_error(e);
                    x.shallow_clone()
                }
            },
            _ => match self.fused(x, train, epilogue) {
                Some(y) => return y,
                None => x.apply_t(&self.bn, train),
            },
        };
        match epilogue {
            Epilogue::None => normalised,
            Epilogue::Relu => normalised.relu(),
            Epilogue::AddRelu(r) => (normalised + r).relu(),
            Epilogue::Gelu => normalised.gelu("none"),
        }
    }

    /// Batch norm and its epilogue through csrc/bn_relu.cpp, when it applies: CPU, channels_last,
    /// f32 or bf16 activations (and a residual of the same shape, layout and dtype). In training
    /// it passes over the activations 8 times per step where libtorch's batch norm and ReLU pass
    /// 13 times, 11 where they and the residual add pass 16, 9 where batch norm and GELU pass
    /// 13; in inference once (read, write) where they pass 4 or 7 times (see the file). `None`:
    /// use libtorch's (also for inference that needs an autograd graph, which the kernel does
    /// not build).
    fn fused(&self, x: &Tensor, train: bool, epilogue: Epilogue) -> Option<Tensor> {
        let (Some(w), Some(b)) = (&self.bn.ws, &self.bn.bs) else {
            return None;
        };
        let residual_fits = match epilogue {
            Epilogue::AddRelu(r) => {
                r.device() == tch::Device::Cpu
                    && r.kind() == x.kind()
                    && r.size() == x.size()
                    && is_channels_last(r)
            }
            _ => true,
        };
        // Batch statistics need more than one value per channel.
        let enough_values = !train || x.size()[0] * x.size()[2] * x.size()[3] > 1;
        let eligible = x.device() == tch::Device::Cpu
            && matches!(x.kind(), Kind::Float | Kind::BFloat16)
            && is_channels_last(x)
            && enough_values
            && residual_fits
            && fused_enabled();
        if !eligible {
            return None;
        }
        let mut out = std::ptr::null_mut();
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let (code, residual) = match epilogue {
            Epilogue::None => (0, std::ptr::null_mut()),
            Epilogue::Relu => (1, std::ptr::null_mut()),
            Epilogue::AddRelu(r) => (2, ptr(r)),
            Epilogue::Gelu => (3, std::ptr::null_mut()),
        };
        // SAFETY: all tensors passed are live for the duration of the call; a non-null `out` is a
        // fresh `at::Tensor*` whose ownership passes to the returned Tensor.
        let err = unsafe {
            crate::ffi::tricks_bn_fused(
                ptr(x),
                ptr(w),
                ptr(b),
                ptr(&self.bn.running_mean),
                ptr(&self.bn.running_var),
                train,
                self.momentum,
                self.eps,
                code,
                residual,
                &mut out,
            )
        };
        match crate::ffi::take_error(err) {
            None if out.is_null() => None,
            None => Some(unsafe { Tensor::from_ptr(out as *mut _) }),
            Some(msg) => {
                // The checks above make this a bug, not bad input: say so once, keep training.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!("warning: fused batch norm failed ({msg}); using libtorch's")
                });
                None
            }
        }
    }

    /// Training-mode batch norm over the global batch: per-channel sums over every rank (an
    /// autograd-aware all-reduce, so the backward pass also sums the statistics' gradients over
    /// ranks), then the usual normalisation and running-statistics update.
    fn synchronised(
        &self,
        x: &Tensor,
        group: &distributed::ProcessGroup,
    ) -> anyhow::Result<Tensor> {
        let c = x.size()[1];
        let dims: &[i64] = &[0, 2, 3];
        // Sums around the running mean (identical on every rank) rather than 0: E[x²] − E[x]²
        // then cancels far less when the mean is large against the spread.
        let shift = self.bn.running_mean.detach().view([1, c, 1, 1]);
        let xs = x.to_kind(Kind::Float) - &shift;
        let local = Tensor::cat(
            &[
                xs.sum_dim_intlist(dims, false, Kind::Float),
                xs.square().sum_dim_intlist(dims, false, Kind::Float),
                crate::device::upload(
                    &Tensor::from_slice(&[(x.numel() as i64 / c) as f32]),
                    x.device(),
                ),
            ],
            0,
        );
        let global = group.all_reduce_sum_autograd(&local.to_device(group.device))?;
        let global = global.to_device(x.device());
        let n = global.narrow(0, 2 * c, 1).detach();
        let mean_shifted = global.narrow(0, 0, c) / &n;
        let var = global.narrow(0, c, c) / &n - mean_shifted.square();
        let mean = &mean_shifted + self.bn.running_mean.detach();
        tch::no_grad(|| {
            // n/(n−1) as a tensor: reading n back to the host would stall a GPU at every layer.
            let unbiased = var.detach() * (&n / (&n - 1.0).clamp_min(1.0));
            let mut rm = self.bn.running_mean.shallow_clone();
            let mut rv = self.bn.running_var.shallow_clone();
            let _ = rm
                .g_mul_scalar_(1.0 - self.momentum)
                .g_add_(&(mean.detach() * self.momentum));
            let _ = rv
                .g_mul_scalar_(1.0 - self.momentum)
                .g_add_(&(unbiased * self.momentum));
        });
        let scale = (var + self.eps).rsqrt();
        let scale = match &self.bn.ws {
            Some(w) => scale * w,
            None => scale,
        };
        let shift = match &self.bn.bs {
            Some(b) => b - &mean * &scale,
            None => -(&mean * &scale),
        };
        let y = x.to_kind(Kind::Float) * scale.view([1, c, 1, 1]) + shift.view([1, c, 1, 1]);
        Ok(y.to_kind(x.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DistributedConfig;
    use crate::distributed::{launch::free_port, DistEnv, ProcessGroup};
    use std::sync::Arc;
    use tch::{Device, Kind};

    /// On one rank the synchronised path must be the native batch norm: same output, same
    /// running statistics, same gradients for the input, γ and β.
    #[test]
    fn synchronised_batch_norm_on_one_rank_matches_native() {
        let env = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: free_port().unwrap(),
        };
        let group =
            Arc::new(ProcessGroup::init(&env, &DistributedConfig::default(), Device::Cpu).unwrap());
        tch::manual_seed(3);
        let x0 = Tensor::randn([8, 4, 5, 5], (Kind::Float, Device::Cpu)) * 2.0 + 0.7;
        let g = Tensor::randn([8, 4, 5, 5], (Kind::Float, Device::Cpu));
        let run = |sync: bool| {
            let vs = nn::VarStore::new(Device::Cpu);
            let bn = batch_norm2d(vs.root(), 4, 1.0);
            tch::no_grad(|| {
                let _ = bn.bn.ws.as_ref().unwrap().shallow_clone().fill_(1.5);
                let _ = bn.bn.bs.as_ref().unwrap().shallow_clone().fill_(-0.25);
            });
            let x = x0.copy().set_requires_grad(true);
            let _guard = sync.then(|| distributed::enable_sync_bn(group.clone()));
            let y = bn.forward_t(&x, true);
            (&y * &g).sum(Kind::Float).backward();
            let grads = [
                x.grad(),
                bn.bn.ws.as_ref().unwrap().grad(),
                bn.bn.bs.as_ref().unwrap().grad(),
            ];
            (
                y.detach(),
                grads,
                bn.bn.running_mean.copy(),
                bn.bn.running_var.copy(),
            )
        };
        let (y1, g1, m1, v1) = run(false);
        let (y2, g2, m2, v2) = run(true);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = f64::try_from((a - b).abs().max()).unwrap();
            assert!(d < 1e-4, "{what}: max difference {d}");
        };
        close(&y1, &y2, "output");
        close(&m1, &m2, "running mean");
        close(&v1, &v2, "running var");
        for (a, (b, what)) in g1
            .iter()
            .zip(g2.iter().zip(["input grad", "γ grad", "β grad"]))
        {
            close(a, b, what);
        }
    }

    /// The fused CPU kernel against libtorch's batch norm (+ ReLU, + residual add and ReLU, +
    /// GELU) on the same channels_last batch: output, running statistics, and the gradients of
    /// x, γ, β and the residual.
    #[test]
    fn fused_batch_norm_epilogues_match_libtorch() {
        tch::manual_seed(5);
        for (kind, tol) in [(Kind::Float, 2e-5), (Kind::BFloat16, 2e-2)] {
            for epilogue in ["none", "relu", "add_relu", "gelu"] {
                for (n, c, h) in [(4, 24, 5), (3, 3, 7)] {
                    let cl = |t: Tensor| crate::device::to_channels_last(&t.to_kind(kind));
                    let randn = || Tensor::randn([n, c, h, h], (Kind::Float, Device::Cpu));
                    let x0 = cl(randn() * 3.0 + 1.5);
                    let r0 = cl(randn() * 2.0);
                    let g = cl(randn());
                    let gamma = Tensor::rand([c], (Kind::Float, Device::Cpu)) + 0.5;
                    let beta = Tensor::randn([c], (Kind::Float, Device::Cpu)) * 0.5;
                    // The reference's ReLU takes its mask from the fused output: where the
                    // pre-activation is within rounding of 0 the two kernels may fall on either
                    // side, and both are right.
                    let run = |mask: Option<&Tensor>| {
                        let vs = nn::VarStore::new(Device::Cpu);
                        let bn = batch_norm2d(vs.root(), c, 1.0);
                        tch::no_grad(|| {
                            bn.bn.ws.as_ref().unwrap().shallow_clone().copy_(&gamma);
                            bn.bn.bs.as_ref().unwrap().shallow_clone().copy_(&beta);
                            let _ = bn.bn.running_mean.shallow_clone().fill_(0.3);
                        });
                        let x = x0.copy().set_requires_grad(true);
                        let r = r0.copy().set_requires_grad(true);
                        let y = match (mask, epilogue) {
                            (None, "none") => bn.fused(&x, true, Epilogue::None),
                            (None, "relu") => bn.fused(&x, true, Epilogue::Relu),
                            (None, "gelu") => bn.fused(&x, true, Epilogue::Gelu),
                            (None, _) => bn.fused(&x, true, Epilogue::AddRelu(&r)),
                            (Some(_), "none") => Some(x.apply_t(&bn.bn, true)),
                            (Some(m), "relu") => Some(x.apply_t(&bn.bn, true) * m),
                            (Some(_), "gelu") => Some(x.apply_t(&bn.bn, true).gelu("none")),
                            (Some(m), _) => Some((x.apply_t(&bn.bn, true) + &r) * m),
                        }
                        .expect("the fused kernel applies");
                        assert_eq!(y.kind(), kind);
                        assert!(is_channels_last(&y));
                        (&y * &g).sum(Kind::Float).backward();
                        let grads = [
                            x.grad(),
                            bn.bn.ws.as_ref().unwrap().grad(),
                            bn.bn.bs.as_ref().unwrap().grad(),
                            r.grad(),
                        ];
                        (y.detach(), grads, bn)
                    };
                    let (y_fused, g_fused, bn_fused) = run(None);
                    let mask = y_fused.gt(0.0).to_kind(kind);
                    let (y_ref, g_ref, bn_ref) = run(Some(&mask));
                    let what = format!("{kind:?} {epilogue} [{n},{c},{h},{h}]");
                    assert_close(&y_fused, &y_ref, tol, &format!("{what}: output"));
                    for (name, a, b) in [
                        (
                            "running mean",
                            &bn_fused.bn.running_mean,
                            &bn_ref.bn.running_mean,
                        ),
                        (
                            "running var",
                            &bn_fused.bn.running_var,
                            &bn_ref.bn.running_var,
                        ),
                    ] {
                        assert_close(a, b, 1e-5, &format!("{what}: {name}"));
                    }
                    for (name, a, b) in [
                        ("dx", &g_fused[0], &g_ref[0]),
                        ("dγ", &g_fused[1], &g_ref[1]),
                        ("dβ", &g_fused[2], &g_ref[2]),
                    ] {
                        // Gradients sum over the batch: bf16 rounding of x and dy adds up.
                        let t = if kind == Kind::Float { 2e-4 } else { 5e-2 };
                        assert_close(a, b, t, &format!("{what}: {name}"));
                    }
                    // The residual's gradient is dy masked: exact in either dtype.
                    if epilogue == "add_relu" {
                        assert_close(&g_fused[3], &g_ref[3], 0.0, &format!("{what}: dr"));
                    } else {
                        assert!(!g_fused[3].defined(), "{what}: no residual, no gradient");
                    }
                }
            }
        }
    }

    /// Inference mode (running statistics, no graph): the fused kernel against libtorch's batch
    /// norm (+ ReLU, + residual add and ReLU, + GELU); with a graph needed, it declines.
    #[test]
    fn fused_inference_matches_libtorch_and_declines_when_a_graph_is_needed() {
        tch::manual_seed(7);
        let (n, c, h) = (3, 20, 6);
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = batch_norm2d(vs.root(), c, 1.0);
        tch::no_grad(|| {
            let opts = (Kind::Float, Device::Cpu);
            let set = |t: &Tensor, v: Tensor| {
                t.shallow_clone().copy_(&v);
            };
            set(bn.bn.ws.as_ref().unwrap(), Tensor::rand([c], opts) + 0.5);
            set(bn.bn.bs.as_ref().unwrap(), Tensor::randn([c], opts) * 0.5);
            set(&bn.bn.running_mean, Tensor::randn([c], opts));
            set(&bn.bn.running_var, Tensor::rand([c], opts) * 2.0 + 0.1);
        });
        for (kind, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 1e-2)] {
            let cl = |t: Tensor| crate::device::to_channels_last(&t.to_kind(kind));
            let x = cl(Tensor::randn([n, c, h, h], (Kind::Float, Device::Cpu)) * 2.0 + 0.5);
            let r = cl(Tensor::randn([n, c, h, h], (Kind::Float, Device::Cpu)));
            let reference = x.apply_t(&bn.bn, false);
            let cases = [
                ("none", Epilogue::None, reference.shallow_clone()),
                ("relu", Epilogue::Relu, reference.relu()),
                ("add_relu", Epilogue::AddRelu(&r), (&reference + &r).relu()),
                // Normalised values up to about ±30: GELU's tails, where its exp underflows.
                ("gelu", Epilogue::Gelu, reference.gelu("none")),
            ];
            let stats = (bn.bn.running_mean.copy(), bn.bn.running_var.copy());
            for (name, epilogue, expected) in cases {
                let y = tch::no_grad(|| bn.fused(&x, false, epilogue))
                    .expect("the fused kernel applies without a graph");
                assert_eq!(y.kind(), kind);
                assert!(is_channels_last(&y));
                assert_close(&y, &expected, tol, &format!("{kind:?} {name}: output"));
            }
            assert!(
                bn.bn.running_mean.equal(&stats.0) && bn.bn.running_var.equal(&stats.1),
                "inference must not move the running statistics"
            );
            // γ and β require grad and grad mode is on: the result would need a graph.
            assert!(bn.fused(&x, false, Epilogue::Relu).is_none());
        }
    }

    /// A residual of another dtype or layout is not fused (libtorch's kernels run instead),
    /// and the fallback computes the same block end.
    #[test]
    fn mismatched_residual_falls_back_to_libtorch() {
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = batch_norm2d(vs.root(), 8, 1.0);
        let x = crate::device::to_channels_last(&Tensor::randn(
            [2, 8, 4, 4],
            (Kind::Float, Device::Cpu),
        ));
        let nchw = Tensor::randn([2, 8, 4, 4], (Kind::Float, Device::Cpu));
        assert!(bn.fused(&x, true, Epilogue::AddRelu(&nchw)).is_none());
        let half = crate::device::to_channels_last(&nchw.to_kind(Kind::BFloat16));
        assert!(bn.fused(&x, true, Epilogue::AddRelu(&half)).is_none());
        let cl = crate::device::to_channels_last(&nchw);
        assert!(bn.fused(&x, true, Epilogue::AddRelu(&cl)).is_some());
        let y = bn.forward_add_relu(&x, &nchw, false);
        let expected = (x.apply_t(&bn.bn, false) + &nchw).relu();
        assert_close(&y, &expected, 1e-6, "eval-mode block end");
    }

    /// |a − b| ≤ tol · (1 + max |b|), elementwise, in f64.
    fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        assert_eq!(a.size(), b.size(), "{what}: shapes");
        let scale = 1.0 + b.abs().max().double_value(&[]);
        let err = (&a - &b).abs().max().double_value(&[]);
        assert!(
            err <= tol * scale,
            "{what}: max |a-b| = {err}, scale {scale}"
        );
    }
}
