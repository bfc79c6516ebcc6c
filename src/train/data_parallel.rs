//! The trainer's side of data-parallel runs (the `distributed` module holds the c10d binding):
//! replicas that start identical, gradients averaged by DDP's Reducer, steps agreed across ranks
//! (a NaN loss or a stop signal on any rank stops all of them at the same step), metrics summed
//! over ranks, and a check at every epoch that the replicas are still identical.

use super::optim::{Optimizer, Param};
use crate::checkpoint::TrainState;
use crate::config::DistributedConfig;
use crate::distributed::{self, GradReducer, ProcessGroup, SyncBnGuard};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// One rank's data-parallel state for a training run.
pub struct DataParallel {
    pub group: Arc<ProcessGroup>,
    reducer: GradReducer,
    sync_bn: Option<SyncBnGuard>,
}

impl DataParallel {
    /// Set up once the replica holds its final weights (after [`sync_from_rank0`] and any
    /// layout change): DDP's Reducer over the optimizer's parameters and, with
    /// `distributed.sync_bn`, global batch-norm statistics.
    pub fn new(group: Arc<ProcessGroup>, opt: &Optimizer, cfg: &DistributedConfig) -> Result<Self> {
        let params: Vec<(String, Tensor)> = opt
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        let reducer = GradReducer::new(group.clone(), &params, cfg.bucket_mb)?;
        let sync_bn = cfg
            .sync_bn
            .then(|| distributed::enable_sync_bn(group.clone()));
        Ok(DataParallel {
            group,
            reducer,
            sync_bn,
        })
    }

    pub fn rank(&self) -> usize {
        self.group.rank
    }

    pub fn world_size(&self) -> usize {
        self.group.world_size
    }

    pub fn sync_bn(&self) -> bool {
        self.sync_bn.is_some()
    }

    /// Before a training backward: arms the Reducer's gradient hooks.
    pub fn before_backward(&self) -> Result<()> {
        distributed::take_sync_bn_error()?;
        self.reducer.prepare()
    }

    /// Rank 0's batch-norm running statistics (and any other non-trained tensor) on every rank,
    /// so that all replicas evaluate and save the same model. (With per-rank BN each rank's
    /// running statistics follow its own batches; DDP broadcasts them before every forward.)
    pub fn broadcast_buffers(&self, vs: &nn::VarStore) -> Result<()> {
        if self.sync_bn() {
            return Ok(()); // already identical: every rank updated them with the global statistics
        }
        for (_, t) in sorted_variables(vs) {
            if !t.requires_grad() {
                self.group.broadcast_into(&t)?;
            }
        }
        Ok(())
    }

    /// Fails on every rank when a replica's weights differ from rank 0's (a bug or a hardware
    /// fault: averaged gradients keep replicas bit-identical).
    pub fn check_replicas(&self, vs: &nn::VarStore) -> Result<()> {
        let fingerprint: Vec<f64> = sorted_variables(vs)
            .iter()
            .flat_map(|(_, t)| {
                let t = t.detach().to_kind(Kind::Double);
                [
                    f64::try_from(t.sum(Kind::Double)).unwrap_or(f64::NAN),
                    f64::try_from(t.square().sum(Kind::Double)).unwrap_or(f64::NAN),
                ]
            })
            .collect();
        let bytes: Vec<u8> = fingerprint.iter().flat_map(|v| v.to_le_bytes()).collect();
        let reference = self.group.broadcast_bytes(&bytes)?;
        let differs = reference != bytes;
        if self.group.any(differs)? {
            bail!(
                "the model replicas diverged (rank {} {} rank 0's weights); stopping",
                self.rank(),
                if differs {
                    "differs from"
                } else {
                    "matches, another rank differs from"
                }
            );
        }
        Ok(())
    }

    /// Sums per-rank values (losses, counts) over ranks.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        self.group.sum_f64(values)
    }
}

fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Makes every rank start from rank 0's replica: weights and buffers, momentum buffers and the
/// training state (so only rank 0 needs to read a checkpoint to resume).
pub fn sync_from_rank0(
    group: &ProcessGroup,
    vs: &nn::VarStore,
    opt: &mut Optimizer,
    state: &mut TrainState,
) -> Result<()> {
    let ctx = "making the replicas identical to rank 0";
    for (_, t) in sorted_variables(vs) {
        group.broadcast_into(&t).context(ctx)?;
    }
    let has: Vec<u8> = opt
        .params
        .iter()
        .map(|p| u8::from(p.momentum.is_some()))
        .collect();
    let has = group.broadcast_bytes(&has).context(ctx)?;
    broadcast_moments(group, &mut opt.params, &has, |p| &mut p.momentum).context(ctx)?;
    if let Some(steps) = opt.adam_steps() {
        broadcast_moments(group, &mut opt.params, &has, |p| &mut p.second).context(ctx)?;
        let steps = group.broadcast_bytes(&steps.to_le_bytes()).context(ctx)?;
        let steps = <[u8; 8]>::try_from(steps.as_slice()).context("rank 0's Adam steps")?;
        opt.set_adam_steps(u64::from_le_bytes(steps));
    }
    if let Some(la) = opt.lookahead_mut() {
        for (_, t) in la.state_tensors() {
            group.broadcast_into(&t).context(ctx)?;
        }
    }
    if let Some(ema) = opt.ema_mut() {
        for (_, t) in ema.state_tensors() {
            group.broadcast_into(&t).context(ctx)?;
        }
    }
    let json = serde_json::to_vec(state)?;
    let json = group.broadcast_bytes(&json).context(ctx)?;
    *state = serde_json::from_slice(&json).context("rank 0's training state")?;
    Ok(())
}

/// Broadcasts one optimizer moment (SGD's momentum / Adam's first, or Adam's second) of every
/// parameter from rank 0: where rank 0 has one (`has`), a rank without it starts one of zeros to
/// receive it; where rank 0 has none, every rank drops its own.
fn broadcast_moments(
    group: &ProcessGroup,
    params: &mut [Param],
    has: &[u8],
    moment: impl Fn(&mut Param) -> &mut Option<Tensor>,
) -> Result<()> {
    for (p, &h) in params.iter_mut().zip(has) {
        if h == 0 {
            *moment(p) = None;
            continue;
        }
        if moment(p).is_none() {
            *moment(p) = Some(p.tensor.detach().zeros_like());
        }
        if let Some(buf) = moment(p) {
            group.broadcast_into(buf)?;
        }
    }
    Ok(())
}

/// With `TRICKS_DEBUG_RANK_WEIGHTS=DIR`, every rank writes its final weights to
/// `DIR/rank<R>.safetensors`, to compare replicas from outside (tests, debugging).
pub fn dump_rank_weights(rank: usize, vs: &nn::VarStore) -> Result<()> {
    let Ok(dir) = std::env::var("TRICKS_DEBUG_RANK_WEIGHTS") else {
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir}"))?;
    let tensors: Vec<(String, Tensor)> = sorted_variables(vs)
        .into_iter()
        .map(|(k, t)| (k, t.detach().contiguous()))
        .collect();
    crate::checkpoint::save(
        &Path::new(&dir).join(format!("rank{rank}.safetensors")),
        &tensors,
        None,
        &[],
        None,
    )
}
