//! The segmentation batch loader: decode + joint transforms + normalisation on the shared rayon
//! pool of the classification loader, prefetched by a background thread.
//!
//! Determinism as in classification: the training order is a permutation drawn from
//! `derive_seed(seed, "segment-perm", epoch)`, and the random choices of the sample at position
//! `p` of the epoch from `derive_seed(seed, "segment-sample", epoch, p)`, so batches do not depend
//! on the number of threads and a resumed run replays them. Evaluation batches keep the file
//! order; images of different sizes in one batch are padded on the right/bottom to the largest
//! (image 0, mask `ignore_index`, so padding never counts in the metrics).

use super::dataset::{Mask, SegDataset};
use super::transforms::{pad_crop_pair, JointTransform};
use crate::config::Config;
use crate::data::loader::thread_pool;
use crate::data::{Image, Mode, Pass, Plan, Shard};
use crate::train::derive_seed;
use anyhow::{anyhow, bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use rayon::ThreadPool;
use std::sync::Arc;
use tch::Tensor;

/// One batch, on the CPU.
#[derive(Debug)]
pub struct SegBatch {
    /// `[B,3,H,W]` f32, normalised with `data.mean` / `data.std`.
    pub images: Tensor,
    /// `[B,H,W]` i64 class ids, `ignore_index` for void and padding.
    pub masks: Tensor,
}

impl SegBatch {
    pub fn len(&self) -> usize {
        self.masks.size()[0] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Job {
    ds: Arc<SegDataset>,
    plan: Plan,
    transform: JointTransform,
    num_classes: i64,
    pool: Arc<ThreadPool>,
}

/// Checks that every mask value is a class id or `ignore`; the error names the first bad pixel.
fn check_mask(mask: &Mask, num_classes: i64, ignore: u8) -> std::result::Result<(), String> {
    match mask.data.iter().position(|&v| v != ignore && v as i64 >= num_classes) {
        None => Ok(()),
        Some(i) => Err(format!(
            "value {} at (x {}, y {}) is neither a class id (0..{}) nor segment.ignore_index ({ignore})",
            mask.data[i],
            i % mask.width as usize,
            i / mask.width as usize,
            num_classes - 1
        )),
    }
}

impl Job {
    fn load(&self, pos: usize) -> Result<(Image, Mask)> {
        let i = self.plan.order[pos];
        let (img, mask) = self.ds.sample(i)?;
        check_mask(&mask, self.num_classes, self.transform.ignore)
            .map_err(|e| anyhow!("bad mask {}: {e}", self.ds.mask_path(i).display()))?;
        Ok(match self.plan.mode {
            Mode::Train { seed, epoch } => {
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
                    seed,
                    "segment-sample",
                    epoch,
                    self.plan.epoch_position(pos) as u64,
                ));
                self.transform.train_pair(&img, &mask, &mut rng)
            }
            Mode::Eval => (img, mask),
        })
    }

    fn make_batch(&self, b: usize) -> Result<SegBatch> {
        let start = self.plan.batch(b).start;
        let samples: Vec<Result<(Image, Mask)>> = self.pool.install(|| {
            self.plan
                .batch(b)
                .into_par_iter()
                .map(|pos| self.load(pos))
                .collect()
        });
        let mut pairs = Vec::with_capacity(samples.len());
        for (r, s) in samples.into_iter().enumerate() {
            match s {
                Ok(p) => pairs.push(p),
                Err(e) => bail!("{e:#} (sample {} of the epoch)", start + r),
            }
        }
        let h = pairs.iter().map(|(i, _)| i.height).max().unwrap_or(0) as usize;
        let w = pairs.iter().map(|(i, _)| i.width).max().unwrap_or(0) as usize;
        let ignore = self.transform.ignore;
        let t = &self.transform;
        let rows: Vec<(Vec<f32>, Vec<i64>)> = self.pool.install(|| {
            pairs
                .par_iter()
                .map(|(img, mask)| {
                    let padded;
                    let (img, mask) = if (img.width as usize, img.height as usize) == (w, h) {
                        (img, mask)
                    } else {
                        padded = pad_crop_pair(img, mask, w as u32, h as u32, 0, 0, ignore);
                        (&padded.0, &padded.1)
                    };
                    let mut x = vec![0f32; 3 * w * h];
                    t.normalize_into(img, &mut x);
                    (x, mask.data.iter().map(|&v| v as i64).collect())
                })
                .collect()
        });
        let n = rows.len() as i64;
        let mut xs = Vec::with_capacity(rows.len() * 3 * w * h);
        let mut ys = Vec::with_capacity(rows.len() * w * h);
        for (x, y) in rows {
            xs.extend_from_slice(&x);
            ys.extend_from_slice(&y);
        }
        Ok(SegBatch {
            images: Tensor::from_slice(&xs).view([n, 3, h as i64, w as i64]),
            masks: Tensor::from_slice(&ys).view([n, h as i64, w as i64]),
        })
    }
}

/// The batches of one pass over a segmentation dataset.
pub type SegLoader = Pass<SegBatch>;

impl SegLoader {
    /// Shuffled, drop_last, the training transform (random scale, crop, flip).
    pub fn train(
        ds: Arc<SegDataset>,
        cfg: &Config,
        batch_size: usize,
        seed: u64,
        epoch: usize,
    ) -> SegLoader {
        Self::train_from(ds, cfg, batch_size, seed, epoch, 0)
    }

    /// [`SegLoader::train`] from batch `first_batch` of the epoch on: the same batches the full
    /// pass yields from there (same samples, same augmentation), for a mid-epoch resume.
    pub fn train_from(
        ds: Arc<SegDataset>,
        cfg: &Config,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
    ) -> SegLoader {
        Self::train_shard(ds, cfg, batch_size, seed, epoch, first_batch, Shard::SINGLE)
    }

    /// One process's share of a data-parallel epoch, as [`crate::data::Loader::train_shard`]:
    /// rank r's batch s is the r-th slice of the single-process global batch s (of
    /// `batch_size · shard.world` samples), augmented as it would be in one process.
    pub fn train_shard(
        ds: Arc<SegDataset>,
        cfg: &Config,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> SegLoader {
        let mut order: Vec<usize> = (0..ds.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
            seed,
            "segment-perm",
            epoch as u64,
            0,
        )));
        let plan = Plan::train(&order, batch_size, seed, epoch, first_batch, shard);
        Self::start(ds, cfg, plan)
    }

    /// In file order, last partial batch kept, full images without augmentation.
    pub fn eval(ds: Arc<SegDataset>, cfg: &Config, batch_size: usize) -> SegLoader {
        Self::eval_shard(ds, cfg, batch_size, Shard::SINGLE)
    }

    /// [`SegLoader::eval`] over every `shard.world`-th image from `shard.rank` on: the ranks of
    /// a data-parallel run together evaluate each image once.
    pub fn eval_shard(
        ds: Arc<SegDataset>,
        cfg: &Config,
        batch_size: usize,
        shard: Shard,
    ) -> SegLoader {
        let plan = Plan::eval(ds.len(), batch_size, shard);
        Self::start(ds, cfg, plan)
    }

    fn start(ds: Arc<SegDataset>, cfg: &Config, plan: Plan) -> SegLoader {
        let job = Job {
            ds,
            plan: plan.clone(),
            transform: JointTransform::new(cfg),
            num_classes: cfg.segment.num_classes,
            pool: thread_pool(cfg.data.workers),
        };
        let name = "tricks-segment-prefetch";
        Pass::spawn_batches(name, cfg.data.prefetch, &plan, move |b| job.make_batch(b))
    }
}
