//! The detection batch loader: decode + joint augmentation on the shared rayon pool of the
//! classification loader, prefetched by a background thread ([`crate::data::Pass`]).
//!
//! A batch is a list of images of any size (the model's input transform resizes and pads them,
//! as torchvision's `GeneralizedRCNNTransform`), their targets, and the shorter side each image
//! is to be resized to.
//!
//! Determinism as in the other tasks: the training order is a permutation drawn from
//! `derive_seed(seed, "detect-perm", epoch, 0)`, and the random choices of the sample at
//! position `p` of the epoch from `derive_seed(seed, "detect-sample", epoch, p)` (in this order:
//! the crop, the flip, the training scale), so batches do not depend on the number of threads or
//! processes and a resumed run replays them. Evaluation keeps the dataset order, no
//! augmentation, the last batch kept.

use super::dataset::{DetDataset, Object};
pub use super::model::Target;
use super::transforms::{hflip, random_crop, to_tensor, CropOptions};
use crate::data::loader::thread_pool;
use crate::data::{Image, Mode, Pass, Plan, Shard};
use crate::engine::TaskBatch;
use crate::train::derive_seed;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::Arc;
use tch::Tensor;

/// Batches made ahead of the trainer.
const PREFETCH: usize = 2;

impl Target {
    /// The target of `objects`: crowd (and VOC difficult) objects and boxes of zero width or
    /// height left out, as torchvision's references do before training.
    pub fn from_objects(objects: &[Object]) -> Target {
        let kept: Vec<&Object> = objects
            .iter()
            .filter(|o| {
                let [x1, y1, x2, y2] = o.bbox;
                !o.iscrowd && x2 > x1 && y2 > y1
            })
            .collect();
        let boxes: Vec<f32> = kept.iter().flat_map(|o| o.bbox).collect();
        let labels: Vec<i64> = kept.iter().map(|o| o.label).collect();
        Target {
            boxes: Tensor::from_slice(&boxes).view([kept.len() as i64, 4]),
            labels: Tensor::from_slice(&labels),
        }
    }
}

/// One batch, on the CPU.
#[derive(Debug)]
pub struct DetBatch {
    /// `[3, H, W]` f32 in [0, 1], not normalised, each at its own size.
    pub images: Vec<Tensor>,
    /// Crowd and zero-size objects removed.
    pub targets: Vec<Target>,
    /// The shorter side each image is to be resized to.
    pub min_sizes: Vec<i64>,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
}

impl DetBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether the batch has no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

impl TaskBatch for DetBatch {
    fn len(&self) -> usize {
        DetBatch::len(self)
    }
}

/// How the loader batches and augments.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Images per batch (per process in a data-parallel run).
    pub batch_size: usize,
    /// Decoding threads (0: the cores of this process).
    pub workers: usize,
    /// Probability of a horizontal flip in training.
    pub hflip_prob: f64,
    /// Shorter sides: training draws one per image (multi-scale training), evaluation takes the
    /// last (torchvision's `GeneralizedRCNNTransform`: `min_size[-1]` when not training).
    pub min_sizes: Vec<i64>,
    /// The random crop in training, if any.
    pub crop: Option<CropOptions>,
}

impl LoaderOptions {
    /// Checks the options; the error names the one that is wrong.
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("detection loader: batch_size must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.hflip_prob) {
            bail!(
                "detection loader: hflip_prob {} is not a probability in [0, 1]",
                self.hflip_prob
            );
        }
        if self.min_sizes.is_empty() || self.min_sizes.iter().any(|&s| s < 1) {
            bail!(
                "detection loader: min_sizes {:?} must list at least one positive size",
                self.min_sizes
            );
        }
        if let Some(crop) = &self.crop {
            crop.check()
                .map_err(|e| anyhow::anyhow!("detection loader: {e}"))?;
        }
        Ok(())
    }
}

/// The batches of one pass over a detection dataset.
pub type DetLoader = Pass<DetBatch>;

/// One training epoch's batches from batch `first_batch` on: shuffled, drop_last, augmented, this
/// rank's share of the global batches (see [`Shard::train_share`]). From `first_batch` on they
/// are exactly those of the full pass, for a mid-epoch resume. Invalid options make a pass that
/// yields the error.
pub fn train_loader(
    ds: Arc<DetDataset>,
    opts: &LoaderOptions,
    seed: u64,
    epoch: usize,
    first_batch: usize,
    shard: Shard,
) -> DetLoader {
    if let Err(e) = opts.check() {
        return failed(e);
    }
    let mut order: Vec<usize> = (0..ds.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
        seed,
        "detect-perm",
        epoch as u64,
        0,
    )));
    let plan = Plan::train(&order, opts.batch_size, seed, epoch, first_batch, shard);
    start(ds, opts, plan)
}

/// An evaluation pass: this rank's share of the images in dataset order (every `world`-th from
/// `rank`), no augmentation, the last batch kept.
pub fn eval_loader(ds: Arc<DetDataset>, opts: &LoaderOptions, shard: Shard) -> DetLoader {
    if let Err(e) = opts.check() {
        return failed(e);
    }
    let plan = Plan::eval(ds.len(), opts.batch_size, shard);
    start(ds, opts, plan)
}

/// A pass that yields `error` and ends.
fn failed(error: anyhow::Error) -> DetLoader {
    let plan = Plan::eval(0, 1, Shard::SINGLE);
    Pass::spawn("tricks-detect-prefetch", 1, &plan, move |tx, _| {
        let _ = tx.send(Err(error));
    })
}

fn start(ds: Arc<DetDataset>, opts: &LoaderOptions, plan: Plan) -> DetLoader {
    let job = Job {
        ds,
        plan: plan.clone(),
        opts: opts.clone(),
        pool: thread_pool(opts.workers),
    };
    Pass::spawn_batches("tricks-detect-prefetch", PREFETCH, &plan, move |b| {
        job.make_batch(b)
    })
}

/// Everything the producer thread needs.
struct Job {
    ds: Arc<DetDataset>,
    plan: Plan,
    opts: LoaderOptions,
    pool: Arc<ThreadPool>,
}

/// One sample ready for the batch.
struct Prepared {
    image: Tensor,
    target: Target,
    min_size: i64,
}

impl Job {
    /// The sample at position `pos` of the plan: decoded, augmented in training.
    fn load(&self, pos: usize) -> Result<Prepared> {
        let i = self.plan.order[pos];
        let image = self.ds.load_image(i)?;
        let objects = self.ds.samples[i].objects.clone();
        let (image, objects, min_size) = match self.plan.mode {
            Mode::Train { seed, epoch } => {
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
                    seed,
                    "detect-sample",
                    epoch,
                    self.plan.epoch_position(pos) as u64,
                ));
                augment(image, objects, &self.opts, &mut rng)
            }
            Mode::Eval => {
                let min_size = *self.opts.min_sizes.last().expect("checked: not empty");
                (image, objects, min_size)
            }
        };
        Ok(Prepared {
            image: to_tensor(&image),
            target: Target::from_objects(&objects),
            min_size,
        })
    }

    fn make_batch(&self, b: usize) -> Result<DetBatch> {
        let positions = self.plan.batch(b);
        let start = positions.start;
        let samples: Vec<Result<Prepared>> = self.pool.install(|| {
            positions
                .into_par_iter()
                .map(|pos| self.load(pos))
                .collect()
        });
        let mut batch = DetBatch {
            images: Vec::with_capacity(samples.len()),
            targets: Vec::with_capacity(samples.len()),
            min_sizes: Vec::with_capacity(samples.len()),
            indices: Vec::with_capacity(samples.len()),
        };
        for (r, s) in samples.into_iter().enumerate() {
            let s = s.map_err(|e| anyhow::anyhow!("{e:#} (sample {} of the epoch)", start + r))?;
            batch.images.push(s.image);
            batch.targets.push(s.target);
            batch.min_sizes.push(s.min_size);
            batch.indices.push(self.plan.order[start + r]);
        }
        Ok(batch)
    }
}

/// The training augmentation of one sample, drawn from `rng` in this order: the crop (when
/// `opts.crop` is set), the flip, the shorter side to resize to.
fn augment(
    image: Image,
    objects: Vec<Object>,
    opts: &LoaderOptions,
    rng: &mut impl Rng,
) -> (Image, Vec<Object>, i64) {
    let (mut image, mut objects) = match &opts.crop {
        Some(crop) => random_crop(image, objects, crop, rng),
        None => (image, objects),
    };
    if rng.gen_bool(opts.hflip_prob) {
        hflip(&mut image, &mut objects);
    }
    let min_size = opts.min_sizes[rng.gen_range(0..opts.min_sizes.len())];
    (image, objects, min_size)
}
