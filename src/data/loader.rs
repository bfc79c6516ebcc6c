//! The batch loader: decode + augment + normalise with a dedicated rayon pool, prefetched by a
//! background thread into a bounded channel.
//!
//! Determinism: the training order is a permutation drawn from (seed, epoch), and every random
//! choice of the sample at position `p` of the epoch is drawn from a ChaCha8 RNG keyed by
//! (seed, epoch, p). Batches are therefore identical whatever the number of worker threads or the
//! scheduling.
//!
//! Bad images: without `skip_bad_images` the batch that holds one is an `Err` naming the file (the
//! first in epoch order) and the iterator ends there. With it the sample is dropped from its batch
//! and counted in [`Batch::skipped`]; a batch in which every image is bad is not yielded, its count
//! is carried to the next batch (only if the very last batches of the epoch are all bad is a
//! 0-row batch yielded, to report the count).

use super::prefetch::Prefetch;
use super::transforms::{Flip, Transform};
use super::{stream_rng, Dataset, TAG_PERM, TAG_SAMPLE};
use crate::config::DataConfig;
use anyhow::{anyhow, Result};
use crossbeam_channel::Sender;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use rayon::ThreadPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

/// One batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B,3,H,W]` f32, normalised with `data.mean` / `data.std`, on the CPU (page-locked with
    /// `data.pin_memory`; see [`DataConfig::for_device`]).
    pub images: Tensor,
    /// `[B]` i64.
    pub labels: Tensor,
    /// Bad images dropped from this batch (only with `data.skip_bad_images`).
    pub skipped: usize,
}

impl Batch {
    /// Number of samples B.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shared decoding pool with `workers` threads (0 = all cores); one pool per thread count per
/// process, so building a loader every epoch does not spawn threads.
pub fn thread_pool(workers: usize) -> Arc<ThreadPool> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let n = if workers == 0 {
        crate::device::cores_per_process()
    } else {
        workers
    };
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    pools
        .entry(n)
        .or_insert_with(|| {
            Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(move |i| format!("tricks-data-{n}-{i}"))
                    .build()
                    .expect("cannot start the data loading threads"),
            )
        })
        .clone()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Train { seed: u64, epoch: u64 },
    Eval,
}

/// The batch buffer's base pointer, shared by the workers that fill disjoint rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint row ranges of one live tensor to the pool's workers.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Everything the producer thread needs.
struct Job {
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    batch_size: usize,
    num_batches: usize,
    mode: Mode,
    transform: Transform,
    pool: Arc<ThreadPool>,
    skip_bad: bool,
    /// Batches in page-locked memory.
    pin: bool,
    /// Batches before this one are not produced (resuming in the middle of an epoch).
    first_batch: usize,
    /// This process's share of a data-parallel run (see [`Loader::train_shard`]).
    shard: Shard,
}

/// Rank `rank` of `world` data-parallel processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's share of an epoch's global order (a distributed sampler): the order cut into
    /// global batches of `batch_size · world` samples, drop_last, and rank r's batch s the r-th
    /// slice of global batch s. Returns the samples and the number of batches.
    pub fn train_share(self, order: &[usize], batch_size: usize) -> (Vec<usize>, usize) {
        let global = batch_size * self.world;
        let num_batches = order.len() / global;
        let mine = (0..num_batches)
            .flat_map(|s| {
                let from = s * global + self.rank * batch_size;
                order[from..from + batch_size].iter().copied()
            })
            .collect();
        (mine, num_batches)
    }

    /// This rank's share of an evaluation split of `len` samples: every `world`-th from `rank`
    /// on, so that the ranks together evaluate each sample once.
    pub fn eval_share(self, len: usize) -> Vec<usize> {
        (self.rank..len).step_by(self.world).collect()
    }

    /// The position in the epoch's global order of this rank's `i`-th training sample (see
    /// [`Shard::train_share`]): its augmentation is drawn from that position, so a sample is
    /// augmented the same way whatever the number of processes.
    pub fn epoch_position(self, i: usize, batch_size: usize) -> usize {
        let b = batch_size;
        (i / b) * b * self.world + self.rank * b + i % b
    }
}

impl Job {
    fn side(&self) -> u32 {
        match self.mode {
            Mode::Train { .. } => self.transform.cfg.train_size,
            Mode::Eval => self.transform.cfg.val_size,
        }
    }

    fn make_batch(&self, b: usize, stop: &AtomicBool) -> Result<Batch> {
        let start = b * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let rows = end - start;
        let side = self.side() as i64;
        let per = 3 * (side * side) as usize;
        // `empty`, not `zeros`: no libtorch kernel (whose OpenMP threads would compete with the
        // decoding pool) and no extra pass over the memory; every row is zeroed then written by
        // the worker that owns it.
        let shape = [rows as i64, 3, side, side];
        let images = if self.pin {
            crate::device::empty_pinned(&shape)?
        } else {
            Tensor::empty(shape, (Kind::Float, Device::Cpu))
        };
        let base = SendPtr(images.data_ptr() as *mut f32);
        let (ds, order, transform, mode) =
            (self.ds.as_ref(), &self.order, &self.transform, self.mode);
        let errors: Vec<Option<anyhow::Error>> = self.pool.install(|| {
            (0..rows)
                .into_par_iter()
                .map(|r| {
                    // SAFETY: `images` is a contiguous f32 CPU tensor of rows·per elements, alive
                    // until the end of this function; row r (elements r·per .. (r+1)·per) is
                    // touched only by this closure call; it is initialised before the slice is made.
                    let out: &mut [f32] = unsafe {
                        let p = base.get().add(r * per);
                        std::ptr::write_bytes(p, 0, per);
                        std::slice::from_raw_parts_mut(p, per)
                    };
                    if stop.load(Ordering::Relaxed) {
                        // The loader was dropped: this batch will never be sent; finish fast.
                        return None;
                    }
                    let img = match ds.image(order[start + r]) {
                        Ok(img) => img,
                        Err(e) => return Some(e),
                    };
                    match mode {
                        Mode::Train { seed, epoch } => {
                            let pos = self.shard.epoch_position(start + r, self.batch_size);
                            let mut rng = stream_rng(seed, epoch, pos as u64, TAG_SAMPLE);
                            let flip = Flip::for_sample(
                                transform.cfg.flip,
                                transform.cfg.alternate_flip,
                                seed,
                                order[start + r],
                                epoch as usize,
                            );
                            transform.train_flipped_into(&img, &mut rng, flip, out);
                        }
                        Mode::Eval => transform.eval_into(&img, out),
                    }
                    None
                })
                .collect()
        });
        let bad = errors.iter().filter(|e| e.is_some()).count();
        if bad > 0 && !self.skip_bad {
            let (r, e) = errors
                .into_iter()
                .enumerate()
                .find_map(|(r, e)| e.map(|e| (r, e)))
                .expect("one error");
            return Err(anyhow!(
                "{e:#} (sample {} of the epoch; set data.skip_bad_images = true to drop unreadable images)",
                start + r
            ));
        }
        let ok: Vec<usize> = (0..rows).filter(|&r| errors[r].is_none()).collect();
        let labels: Vec<i64> = ok.iter().map(|&r| ds.label(order[start + r])).collect();
        let images = if bad > 0 {
            let keep: Vec<i64> = ok.iter().map(|&r| r as i64).collect();
            images.index_select(0, &Tensor::from_slice(&keep))
        } else {
            images
        };
        Ok(Batch {
            images,
            labels: Tensor::from_slice(&labels),
            skipped: bad,
        })
    }

    fn run(self, tx: Sender<Result<Batch>>, stop: &AtomicBool) {
        let mut pending = 0;
        for b in self.first_batch..self.num_batches {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match self.make_batch(b, stop) {
                Ok(mut batch) => {
                    batch.skipped += pending;
                    if batch.is_empty() && b + 1 < self.num_batches {
                        pending = batch.skipped;
                        continue;
                    }
                    pending = 0;
                    if tx.send(Ok(batch)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    }
}

/// An iterator over the batches of one pass over a dataset.
pub struct Loader {
    batches: Prefetch<Batch>,
    num_batches: usize,
    num_samples: usize,
}

impl Loader {
    /// Shuffled (a permutation drawn from (seed, epoch)), drop_last, the training transform of cfg.pipeline.
    pub fn train(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        epoch: usize,
    ) -> Loader {
        Self::train_from(ds, cfg, batch_size, seed, epoch, 0)
    }

    /// [`Loader::train`] starting at batch `first_batch` of the epoch: the batches it yields are
    /// exactly those the full pass yields from that point (the same samples and augmentation), so
    /// an epoch interrupted after `first_batch` steps resumes bit-exactly.
    pub fn train_from(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
    ) -> Loader {
        Self::train_shard(ds, cfg, batch_size, seed, epoch, first_batch, Shard::SINGLE)
    }

    /// One process's share of a data-parallel epoch (a distributed sampler): the epoch's global
    /// order is the single-process permutation, cut into global batches of
    /// `batch_size · shard.world` samples, and rank r's batch s is the r-th slice of global batch
    /// s, augmented as it would be in one process. The ranks together therefore see exactly the
    /// batches of a single process with the global batch size.
    pub fn train_shard(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> Loader {
        assert!(batch_size > 0, "batch size must be positive");
        assert!(
            shard.rank < shard.world,
            "rank must be below the world size"
        );
        let mut order: Vec<usize> = (0..ds.len()).collect();
        order.shuffle(&mut stream_rng(seed, epoch as u64, 0, TAG_PERM));
        let (mine, num_batches) = shard.train_share(&order, batch_size);
        Self::start(
            ds,
            cfg,
            mine,
            batch_size,
            num_batches,
            Mode::Train {
                seed,
                epoch: epoch as u64,
            },
            first_batch,
            shard,
        )
    }

    /// In order, last partial batch kept, the evaluation transform (resize shorter side to val_size/val_crop_ratio, centre crop val_size; for the CIFAR pipeline when the image already is val_size: identity).
    pub fn eval(ds: Arc<dyn Dataset>, cfg: &DataConfig, batch_size: usize) -> Loader {
        Self::eval_shard(ds, cfg, batch_size, Shard::SINGLE)
    }

    /// [`Loader::eval`] over every `shard.world`-th image from `shard.rank` on: the ranks of a
    /// data-parallel run together evaluate each image once.
    pub fn eval_shard(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        shard: Shard,
    ) -> Loader {
        assert!(batch_size > 0, "batch size must be positive");
        let order = shard.eval_share(ds.len());
        let num_batches = order.len().div_ceil(batch_size);
        Self::start(
            ds,
            cfg,
            order,
            batch_size,
            num_batches,
            Mode::Eval,
            0,
            shard,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        order: Vec<usize>,
        batch_size: usize,
        num_batches: usize,
        mode: Mode,
        first_batch: usize,
        shard: Shard,
    ) -> Loader {
        let num_samples = order.len();
        let job = Job {
            ds,
            order,
            batch_size,
            num_batches,
            mode,
            transform: Transform::new(cfg),
            pool: thread_pool(cfg.workers),
            skip_bad: cfg.skip_bad_images,
            // Without a CUDA driver there is no page-locked memory to be had (and no GPU to feed).
            pin: cfg.pin_memory && tch::Cuda::is_available(),
            first_batch: first_batch.min(num_batches),
            shard,
        };
        Loader {
            batches: Prefetch::spawn("tricks-data-prefetch", cfg.prefetch, move |tx, stop| {
                job.run(tx, stop)
            }),
            num_batches,
            num_samples,
        }
    }

    /// Batches of this pass (fewer may be yielded if images are skipped or an error ends it).
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// Samples of this pass before any skipping (train: num_batches · batch_size).
    pub fn num_samples(&self) -> usize {
        self.num_samples
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        self.batches.next()
    }
}
