//! Batch norm that can share its statistics across the ranks of a data-parallel run
//! (`distributed.sync_bn`, PyTorch's SyncBatchNorm). Parameter and buffer names are those of
//! `nn::BatchNorm` (weight, bias, running_mean, running_var), so checkpoints do not change.

use crate::distributed;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// `nn::BatchNorm`'s defaults, which every model here uses.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

#[derive(Debug)]
pub struct BatchNorm2d {
    bn: nn::BatchNorm,
}

/// A 2-D batch norm starting at γ = `gamma`, β = 0.
pub fn batch_norm2d(p: nn::Path, c: i64, gamma: f64) -> BatchNorm2d {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(gamma),
        bs_init: nn::Init::Const(0.0),
        eps: EPS,
        momentum: MOMENTUM,
        ..Default::default()
    };
    BatchNorm2d {
        bn: nn::batch_norm2d(p, c, cfg),
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match distributed::sync_bn_group() {
            Some(group) if train => match self.synchronised(x, &group) {
                Ok(y) => y,
                Err(e) => {
                    // forward cannot fail: the trainer picks the error up after the forward pass.
                    distributed::record_sync_bn_error(e);
                    x.shallow_clone()
                }
            },
            _ => x.apply_t(&self.bn, train),
        }
    }
}

impl BatchNorm2d {
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
                .g_mul_scalar_(1.0 - MOMENTUM)
                .g_add_(&(mean.detach() * MOMENTUM));
            let _ = rv
                .g_mul_scalar_(1.0 - MOMENTUM)
                .g_add_(&(unbiased * MOMENTUM));
        });
        let scale = (var + EPS).rsqrt();
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
}
