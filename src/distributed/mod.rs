//! Data-parallel training on libtorch's own distributed engine, c10d (the engine behind PyTorch
//! DDP and torchrun): Gloo process groups on the CPU, NCCL on CUDA, DDP's gradient Reducer
//! (bucketed all-reduce started from autograd hooks, overlapped with the backward pass), and an
//! autograd-aware all-reduce for synchronised batch norm. The C++ side is `csrc/dist.cpp`.
//!
//! A run is distributed when `WORLD_SIZE` is set (by [`launch`], torchrun-style, or by hand or a
//! scheduler on several machines): every rank reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR` and `MASTER_PORT`, rendezvous at the master's TCP store, and trains a replica.

pub mod launch;

use crate::config::{DistBackend, DistributedConfig};
use crate::ffi;
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// The torchrun environment of one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// Reads the torchrun variables; `None` when `WORLD_SIZE` is not set (a single-process run).
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        if var("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |key: &str, default: Option<usize>| -> Result<usize> {
            match var(key) {
                Some(v) => v.trim().parse::<usize>().map_err(|_| {
                    anyhow!("environment variable {key}={v:?} is not a non-negative integer")
                }),
                None => default.ok_or_else(|| {
                    anyhow!("WORLD_SIZE is set but {key} is not (set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or start the run with `tricks launch`)")
                }),
            }
        };
        let world_size = num("WORLD_SIZE", None)?;
        let rank = num("RANK", None)?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} must be below WORLD_SIZE={world_size} (and WORLD_SIZE at least 1)");
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let local_world_size = num("LOCAL_WORLD_SIZE", Some(world_size))?;
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = num("MASTER_PORT", None)?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| anyhow!("MASTER_PORT={port} is not a TCP port (1-65535)"))?;
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }
}

fn tensor_ptr(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// Whether this binary was built with NCCL support.
pub fn has_nccl() -> bool {
    unsafe { ffi::tricks_dist_has_nccl() == 1 }
}

/// A c10d process group over all ranks of the run.
pub struct ProcessGroup {
    raw: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
    /// Where the tensors of this group's collectives live (CPU for Gloo, the rank's GPU for NCCL).
    pub device: Device,
    timeout: Duration,
}

// SAFETY: c10d process groups are thread-safe; the handle is only freed in Drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins the rendezvous at MASTER_ADDR:MASTER_PORT (rank 0 serves it) and builds the group.
    /// `device` is where this rank trains; the backend follows it unless the config names one.
    pub fn init(env: &DistEnv, cfg: &DistributedConfig, device: Device) -> Result<ProcessGroup> {
        let nccl = match cfg.backend {
            DistBackend::Auto => device.is_cuda(),
            DistBackend::Gloo => false,
            DistBackend::Nccl => true,
        };
        if nccl && !device.is_cuda() {
            bail!("key `distributed.backend` is \"nccl\" but the run is on the CPU: NCCL needs CUDA devices (use \"gloo\" or --device cuda)");
        }
        if nccl && !has_nccl() {
            bail!("key `distributed.backend`: NCCL was asked for but this binary was built without it (run scripts/setup.sh so that the CUDA and NCCL headers are installed, then rebuild), or use \"gloo\"");
        }
        let timeout = Duration::from_secs_f64(cfg.timeout_s);
        let host = CString::new(env.master_addr.clone())
            .map_err(|_| anyhow!("MASTER_ADDR contains a NUL byte"))?;
        let mut raw: *mut c_void = std::ptr::null_mut();
        let err = unsafe {
            ffi::tricks_dist_init(
                i32::from(nccl),
                host.as_ptr(),
                env.master_port as i32,
                env.rank as i32,
                env.world_size as i32,
                timeout.as_millis() as i64,
                &mut raw,
            )
        };
        if let Some(msg) = ffi::take_error(err) {
            bail!(
                "cannot join the process group at {}:{} ({} ranks, {} backend, timeout {:.0}s): {msg}",
                env.master_addr,
                env.master_port,
                env.world_size,
                if nccl { "nccl" } else { "gloo" },
                cfg.timeout_s
            );
        }
        Ok(ProcessGroup {
            raw,
            rank: env.rank,
            world_size: env.world_size,
            device: if nccl { device } else { Device::Cpu },
            timeout,
        })
    }

    fn check(&self, what: &str, err: *mut c_char) -> Result<()> {
        match ffi::take_error(err) {
            None => Ok(()),
            Some(msg) => Err(anyhow!(
                "{what} across {} ranks failed: {msg} (another rank has probably stopped or died: see its output; timeout {:.0}s, key `distributed.timeout_s`)",
                self.world_size,
                self.timeout.as_secs_f64()
            )),
        }
    }

    /// In-place sum over ranks of a contiguous tensor on [`ProcessGroup::device`].
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        let err = unsafe { ffi::tricks_dist_all_reduce_sum(self.raw, tensor_ptr(t)) };
        self.check("all-reduce", err)
    }

    /// In-place element-wise maximum over ranks.
    pub fn all_reduce_max(&self, t: &Tensor) -> Result<()> {
        let err = unsafe { ffi::tricks_dist_all_reduce_max(self.raw, tensor_ptr(t)) };
        self.check("all-reduce (max)", err)
    }

    /// In place: every rank gets `root`'s values.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let err = unsafe { ffi::tricks_dist_broadcast(self.raw, tensor_ptr(t), root as i32) };
        self.check("broadcast", err)
    }

    pub fn barrier(&self) -> Result<()> {
        let err = unsafe { ffi::tricks_dist_barrier(self.raw) };
        self.check("barrier", err)
    }

    /// The sum over ranks of `t`, differentiable: its gradient is the sum over ranks of the
    /// incoming gradients (every rank's loss depends on the sum).
    pub fn all_reduce_sum_autograd(&self, t: &Tensor) -> Result<Tensor> {
        let mut out: *mut c_void = std::ptr::null_mut();
        let err =
            unsafe { ffi::tricks_dist_all_reduce_sum_autograd(self.raw, tensor_ptr(t), &mut out) };
        self.check("all-reduce (sync batch norm)", err)?;
        // SAFETY: on success `out` is a new heap `at::Tensor*` that the Tensor now owns.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }

    /// Sums `values` over ranks (in f64).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }

    /// True on every rank when it is true on any.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let t = Tensor::from_slice(&[i64::from(flag)]).to_device(self.device);
        self.all_reduce_max(&t)?;
        Ok(i64::try_from(t.to_device(Device::Cpu))? != 0)
    }

    /// Rank 0's bytes on every rank (`bytes` is only read on rank 0).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let len = Tensor::from_slice(&[bytes.len() as i64]).to_device(self.device);
        self.broadcast(&len, 0)?;
        let n = i64::try_from(len.to_device(Device::Cpu))? as usize;
        let data = if self.rank == 0 {
            Tensor::from_slice(bytes)
        } else {
            Tensor::zeros([n as i64], (Kind::Uint8, Device::Cpu))
        }
        .to_device(self.device);
        self.broadcast(&data, 0)?;
        Ok(Vec::<u8>::try_from(data.to_device(Device::Cpu))?)
    }

    /// Copies rank 0's values of `t` (any device, layout or dtype) into `t` on every rank.
    pub fn broadcast_into(&self, t: &Tensor) -> Result<()> {
        let buf = t.detach().to_device(self.device).contiguous();
        let buf = if buf.data_ptr() == t.data_ptr() {
            buf.copy()
        } else {
            buf
        };
        self.broadcast(&buf, 0)?;
        tch::no_grad(|| {
            let mut dst = t.shallow_clone();
            dst.copy_(&buf);
        });
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::tricks_dist_free(self.raw) };
    }
}

/// DDP's gradient Reducer over a model's trainable parameters: during `backward`, gradients are
/// averaged over ranks bucket by bucket as they become ready, so communication overlaps the rest
/// of the backward pass. Call [`GradReducer::prepare`] before every training backward.
pub struct GradReducer {
    raw: *mut c_void,
    // The Reducer holds the group: keep it alive at least as long.
    _group: Arc<ProcessGroup>,
}

// SAFETY: used from the training thread only; the Reducer synchronises its autograd hooks itself.
unsafe impl Send for GradReducer {}
unsafe impl Sync for GradReducer {}

impl GradReducer {
    /// `params` must all require grad. Fails (naming the difference) when the ranks' models differ.
    pub fn new(
        group: Arc<ProcessGroup>,
        params: &[(String, Tensor)],
        bucket_mb: f64,
    ) -> Result<GradReducer> {
        let names: Vec<CString> = params
            .iter()
            .map(|(n, _)| CString::new(n.as_str()).expect("parameter names have no NUL"))
            .collect();
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let tensor_ptrs: Vec<*mut c_void> = params.iter().map(|(_, t)| tensor_ptr(t)).collect();
        let mut raw: *mut c_void = std::ptr::null_mut();
        let err = unsafe {
            ffi::tricks_reducer_new(
                group.raw,
                tensor_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
                params.len() as i32,
                (bucket_mb * 1024.0 * 1024.0) as i64,
                &mut raw,
            )
        };
        group.check("setting up the gradient all-reduce", err)?;
        Ok(GradReducer { raw, _group: group })
    }

    pub fn prepare(&self) -> Result<()> {
        let err = unsafe { ffi::tricks_reducer_prepare(self.raw) };
        self._group.check("preparing the gradient all-reduce", err)
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        if let Some(msg) = ffi::take_error(unsafe { ffi::tricks_reducer_free(self.raw) }) {
            eprintln!("warning: releasing the gradient reducer: {msg}");
        }
    }
}

thread_local! {
    /// The group whose ranks share batch-norm statistics (`distributed.sync_bn`) in the forward
    /// passes this thread runs, if any. Per thread rather than per process: a trainer runs its
    /// forward passes on the thread that set it up, and other models in the process (an
    /// ablation's parallel workers, tests) must not start synchronising with it. A process-wide
    /// slot once made a test's backward pass crash, after another test's group was released.
    static SYNC_BN_GROUP: RefCell<Option<Arc<ProcessGroup>>> = const { RefCell::new(None) };

    /// The first error of a synchronised batch-norm collective on this thread since the last
    /// [`take_sync_bn_error`] (a forward pass cannot return an error; the trainer checks after
    /// each forward).
    static SYNC_BN_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Makes batch-norm layers run by this thread synchronise over `group` until the guard is dropped.
pub fn enable_sync_bn(group: Arc<ProcessGroup>) -> SyncBnGuard {
    let previous = SYNC_BN_GROUP.with(|slot| slot.replace(Some(group)));
    SyncBnGuard {
        previous,
        _same_thread: std::marker::PhantomData,
    }
}

/// Restores the thread's previous sync-BN group when dropped; it cannot leave its thread.
pub struct SyncBnGuard {
    previous: Option<Arc<ProcessGroup>>,
    _same_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for SyncBnGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        SYNC_BN_GROUP.with(|slot| *slot.borrow_mut() = previous);
    }
}

pub fn sync_bn_group() -> Option<Arc<ProcessGroup>> {
    SYNC_BN_GROUP.with(|slot| slot.borrow().clone())
}

pub(crate) fn record_sync_bn_error(err: anyhow::Error) {
    SYNC_BN_ERROR.with(|slot| {
        slot.borrow_mut().get_or_insert_with(|| format!("{err:#}"));
    });
}

/// Fails with the first synchronised batch-norm error recorded on this thread since the last
/// call.
pub fn take_sync_bn_error() -> Result<()> {
    match SYNC_BN_ERROR.with(|slot| slot.borrow_mut().take()) {
        Some(msg) => Err(anyhow!(msg)).context("synchronised batch norm"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn reads_the_torchrun_environment() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!(e.local_world_size, 2);
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 29500));
        // LOCAL_* default to a single machine.
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1234")])
            .unwrap()
            .unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 2));
        assert_eq!(e.master_addr, "127.0.0.1");
    }

    #[test]
    fn bad_environments_name_the_variable() {
        let msg = |vars: &[(&str, &str)]| format!("{:#}", env(vars).unwrap_err());
        assert!(msg(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK"));
        assert!(
            msg(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")])
                .contains("RANK=2 must be below WORLD_SIZE=2")
        );
        assert!(msg(&[("WORLD_SIZE", "x"), ("RANK", "0")]).contains("WORLD_SIZE=\"x\""));
        assert!(
            msg(&[("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_PORT", "70000")])
                .contains("MASTER_PORT=70000")
        );
        assert!(msg(&[("WORLD_SIZE", "1"), ("RANK", "0")]).contains("MASTER_PORT"));
    }

    /// A one-rank Gloo group in this process: the collectives run end to end through c10d.
    #[test]
    fn one_rank_gloo_group_runs_collectives() {
        let port = launch::free_port().unwrap();
        let e = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let g = ProcessGroup::init(&e, &DistributedConfig::default(), Device::Cpu).unwrap();
        assert_eq!(g.sum_f64(&[1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
        assert!(g.any(true).unwrap());
        assert!(!g.any(false).unwrap());
        assert_eq!(g.broadcast_bytes(b"state").unwrap(), b"state".to_vec());
        g.barrier().unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let y = g.all_reduce_sum_autograd(&x).unwrap();
        (&y * &y).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![2.0, 4.0]);
    }
}
