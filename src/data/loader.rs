//! The batch loader: decode + augment + normalise with a dedicated rayon pool, prefetched by a
//! background thread into a bounded channel.
//!
//! Determinism: the training order is a permutation drawn from (seed, epoch), and every random
//! choice of the sample at position `p` of the epoch is drawn from a ChaCha8 RNG keyed by
//! (seed, epoch, p). Batches are therefore identical whatever the number of worker threads or the
//! scheduling. Under repeated augmentation (`data.repeats`, [`Plan::train_repeated`]) `p` is the
//! position in the epoch's repeated list, so the copies of an image are augmented differently.
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

/// What a pass is for: training (random choices drawn from (seed, epoch, position)) or evaluation.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Train { seed: u64, epoch: u64 },
    Eval,
}

/// Which samples one pass over a dataset takes, and in which batches; shared by every task's
/// loader. A training epoch takes this rank's share of a permutation (drop_last); an evaluation
/// pass takes every `world`-th sample in order (the last batch kept).
#[derive(Clone, Debug)]
pub struct Plan {
    /// This process's samples (dataset indices), batch after batch.
    pub order: Vec<usize>,
    pub batch_size: usize,
    pub num_batches: usize,
    /// Batches before this one are not produced (resuming in the middle of an epoch).
    pub first_batch: usize,
    pub mode: Mode,
    pub shard: Shard,
    /// Under repeated augmentation, the copies; `None` for a plain epoch or an evaluation.
    pub repeated: Option<Repeated>,
}

/// How a training plan's samples are cut: `num_batches` of `batch_size`, from `first_batch` on.
#[derive(Clone, Copy)]
struct Batches {
    batch_size: usize,
    num_batches: usize,
    first_batch: usize,
}

/// The copies of a repeated-augmentation epoch ([`Plan::train_repeated`]).
#[derive(Clone, Debug)]
pub struct Repeated {
    /// Copies of each image in the repeated list (`data.repeats`).
    pub repeats: usize,
    /// Which copy of its image (0..repeats) each sample of the plan's `order` is.
    pub copy: Vec<usize>,
}

/// Samples each rank takes per epoch under repeated augmentation from a training set of `len`:
/// ⌊⌊len/256⌋·256 / world⌋, torchvision's `RASampler.num_selected_samples`, so that an epoch
/// stays about one dataset long whatever the number of copies.
pub fn repeated_samples_per_rank(len: usize, world: usize) -> usize {
    len / 256 * 256 / world
}

impl Plan {
    /// A training epoch over `permutation`, the epoch's global order: rank r's batch s is the
    /// r-th slice of the single-process global batch s (see [`Shard::train_share`]), from batch
    /// `first_batch` on.
    pub fn train(
        permutation: &[usize],
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> Plan {
        assert!(batch_size > 0, "batch size must be positive");
        assert!(
            shard.rank < shard.world,
            "rank must be below the world size"
        );
        let (order, num_batches) = shard.train_share(permutation, batch_size);
        let batches = Batches {
            batch_size,
            num_batches,
            first_batch,
        };
        Plan::training(order, batches, seed, epoch, shard, None)
    }

    /// A training plan over `order` (this rank's samples, in order) from batch `first_batch` on.
    fn training(
        order: Vec<usize>,
        b: Batches,
        seed: u64,
        epoch: usize,
        shard: Shard,
        repeated: Option<Repeated>,
    ) -> Plan {
        Plan {
            order,
            batch_size: b.batch_size,
            num_batches: b.num_batches,
            first_batch: b.first_batch.min(b.num_batches),
            mode: Mode::Train {
                seed,
                epoch: epoch as u64,
            },
            shard,
            repeated,
        }
    }

    /// A repeated-augmentation epoch (`data.repeats`; torchvision's `RASampler`, as DeiT uses
    /// it): the list of `permutation` with each index `repeats` times in a row (padded from its
    /// start to a multiple of `shard.world`), rank r taking positions r, r + world, ... of it and
    /// keeping the first [`repeated_samples_per_rank`], cut into batches of `batch_size`
    /// (drop_last), from batch `first_batch` on. Each sample is augmented from its position in
    /// the repeated list, so the copies of an image get different draws.
    pub fn train_repeated(
        permutation: &[usize],
        repeats: usize,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> Plan {
        assert!(batch_size > 0, "batch size must be positive");
        assert!(repeats > 0, "repeats must be positive");
        assert!(
            shard.rank < shard.world,
            "rank must be below the world size"
        );
        let listed = permutation.len() * repeats;
        let kept = repeated_samples_per_rank(permutation.len(), shard.world);
        let num_batches = kept / batch_size;
        // Positions in the repeated list; the padding repeats its start (never reached in
        // fact: a rank keeps at most len / world samples, all of them among the first len).
        let (order, copy) = (0..num_batches * batch_size)
            .map(|i| (shard.rank + i * shard.world) % listed)
            .map(|p| (permutation[p / repeats], p % repeats))
            .unzip();
        let batches = Batches {
            batch_size,
            num_batches,
            first_batch,
        };
        let repeated = Some(Repeated { repeats, copy });
        Plan::training(order, batches, seed, epoch, shard, repeated)
    }

    /// An evaluation pass over `len` samples: this rank's share in order, the last batch kept.
    pub fn eval(len: usize, batch_size: usize, shard: Shard) -> Plan {
        assert!(batch_size > 0, "batch size must be positive");
        let order = shard.eval_share(len);
        let num_batches = order.len().div_ceil(batch_size);
        Plan {
            order,
            batch_size,
            num_batches,
            first_batch: 0,
            mode: Mode::Eval,
            shard,
            repeated: None,
        }
    }

    /// Positions in `order` of batch `b`'s samples.
    pub fn batch(&self, b: usize) -> std::ops::Range<usize> {
        let start = b * self.batch_size;
        start..(start + self.batch_size).min(self.order.len())
    }

    /// The position in the epoch's global order of the sample at position `i` of this plan (its
    /// augmentation is drawn from it): under repeated augmentation the position in the repeated
    /// list.
    pub fn epoch_position(&self, i: usize) -> usize {
        match self.repeated {
            Some(_) => self.shard.rank + i * self.shard.world,
            None => self.shard.epoch_position(i, self.batch_size),
        }
    }

    /// The epoch count by which `data.alternate_flip` mirrors the sample at position `i`: the
    /// epoch, or under repeated augmentation the view `epoch · repeats + copy`, so that the
    /// copies of an image alternate as epochs do (and the views continue across epochs).
    pub fn flip_epoch(&self, i: usize) -> usize {
        let epoch = match self.mode {
            Mode::Train { epoch, .. } => epoch as usize,
            Mode::Eval => 0,
        };
        match &self.repeated {
            Some(r) => epoch * r.repeats + r.copy[i],
            None => epoch,
        }
    }
}

/// An iterator over the batches of one pass, made on a background thread and prefetched into a
/// bounded channel: every task's loader ([`Loader`], the segmentation loader).
pub struct Pass<B> {
    batches: Prefetch<B>,
    num_batches: usize,
    num_samples: usize,
}

impl<B: Send + 'static> Pass<B> {
    /// Runs `produce` on a thread named `name`, which sends the batches of `plan` into a channel
    /// of `capacity` batches and returns when the pass is over or `stop` is set.
    pub fn spawn<F>(name: &str, capacity: usize, plan: &Plan, produce: F) -> Pass<B>
    where
        F: FnOnce(Sender<Result<B>>, &AtomicBool) + Send + 'static,
    {
        Pass {
            batches: Prefetch::spawn(name, capacity, produce),
            num_batches: plan.num_batches,
            num_samples: plan.order.len(),
        }
    }
}

impl<B: Send + 'static> Pass<B> {
    /// [`Pass::spawn`] with the usual producer: batch `b` of `plan` is `make_batch(b)`, for
    /// `b` from `plan.first_batch` on, until the pass is over, `stop` is set, the consumer is
    /// gone or a batch fails (its error is the pass's last item).
    pub fn spawn_batches<F>(name: &str, capacity: usize, plan: &Plan, mut make_batch: F) -> Pass<B>
    where
        F: FnMut(usize) -> Result<B> + Send + 'static,
    {
        let batches = plan.first_batch..plan.num_batches;
        Pass::spawn(name, capacity, plan, move |tx, stop| {
            for b in batches {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let batch = make_batch(b);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        })
    }
}

impl<B> Pass<B> {
    /// Batches of this pass (fewer may be yielded if images are skipped or an error ends it).
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }

    /// Samples of this pass before any skipping (train: num_batches · batch_size).
    pub fn num_samples(&self) -> usize {
        self.num_samples
    }
}

impl<B> Iterator for Pass<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        self.batches.next()
    }
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
    plan: Plan,
    transform: Transform,
    pool: Arc<ThreadPool>,
    skip_bad: bool,
    /// Batches in page-locked memory.
    pin: bool,
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
        match self.plan.mode {
            Mode::Train { .. } => self.transform.cfg.train_size,
            Mode::Eval => self.transform.cfg.val_size,
        }
    }

    fn make_batch(&self, b: usize, stop: &AtomicBool) -> Result<Batch> {
        let start = self.plan.batch(b).start;
        let rows = self.plan.batch(b).len();
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
        let (ds, order, transform, mode) = (
            self.ds.as_ref(),
            &self.plan.order,
            &self.transform,
            self.plan.mode,
        );
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
                            let pos = self.plan.epoch_position(start + r);
                            let mut rng = stream_rng(seed, epoch, pos as u64, TAG_SAMPLE);
                            let flip = Flip::for_sample(
                                transform.cfg.flip,
                                transform.cfg.alternate_flip,
                                seed,
                                order[start + r],
                                self.plan.flip_epoch(start + r),
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
        let num_batches = self.plan.num_batches;
        for b in self.plan.first_batch..num_batches {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match self.make_batch(b, stop) {
                Ok(mut batch) => {
                    batch.skipped += pending;
                    if batch.is_empty() && b + 1 < num_batches {
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

/// The batches of one pass over a classification dataset.
pub type Loader = Pass<Batch>;

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
    /// batches of a single process with the global batch size. With `cfg.repeats` > 1 the same
    /// permutation is repeated and dealt as [`Plan::train_repeated`] says instead.
    pub fn train_shard(
        ds: Arc<dyn Dataset>,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> Loader {
        let mut order: Vec<usize> = (0..ds.len()).collect();
        order.shuffle(&mut stream_rng(seed, epoch as u64, 0, TAG_PERM));
        let plan = match cfg.repeats {
            0 | 1 => Plan::train(&order, batch_size, seed, epoch, first_batch, shard),
            repeats => {
                Plan::train_repeated(&order, repeats, batch_size, seed, epoch, first_batch, shard)
            }
        };
        Self::start(ds, cfg, plan)
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
        let plan = Plan::eval(ds.len(), batch_size, shard);
        Self::start(ds, cfg, plan)
    }

    fn start(ds: Arc<dyn Dataset>, cfg: &DataConfig, plan: Plan) -> Loader {
        let name = "tricks-data-prefetch";
        let job = Job {
            ds,
            plan: plan.clone(),
            transform: Transform::new(cfg),
            pool: thread_pool(cfg.workers),
            skip_bad: cfg.skip_bad_images,
            // Without a CUDA driver there is no page-locked memory to be had (and no GPU to feed).
            pin: cfg.pin_memory && tch::Cuda::is_available(),
        };
        Pass::spawn(name, cfg.prefetch, &plan, move |tx, stop| job.run(tx, stop))
    }
}
