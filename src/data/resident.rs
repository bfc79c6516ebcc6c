//! A dataset held on the training device (`data.on_device`), for small datasets such as CIFAR:
//! every image is decoded once into a u8 tensor on the GPU, and each batch is gathered, padded,
//! cropped, flipped and normalised there in a few kernels, so no image crosses the PCIe bus
//! after the start and no CPU thread sits between the GPU and its data.
//!
//! The CIFAR pipeline only (pad, random crop, flip, normalise): its random choices are drawn
//! exactly as [`super::Loader`] draws them (same ChaCha streams, same order), so a resident
//! batch equals the loader's batch, value for value.

use super::loader::{thread_pool, Batch, Shard};
use super::transforms::{pad_index, Flip};
use super::{stream_rng, Dataset, TAG_PERM, TAG_SAMPLE};
use crate::config::{DataConfig, PadMode, Pipeline};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One split on the device.
pub struct Resident {
    /// `[N,3,H,W]` u8.
    images: Tensor,
    /// `[N]` i64.
    labels: Tensor,
    len: usize,
    side: i64,
    pad: i64,
    flip: bool,
    /// `data.alternate_flip`.
    alternate_flip: bool,
    /// `data.pad_mode = "reflect"`: `[side + 2·pad]` i64, the source row/column of each padded
    /// row/column. None: zero padding.
    reflect_index: Option<Tensor>,
    /// `[1,3,1,1]` f32: normalisation.
    mean: Tensor,
    std: Tensor,
    /// `[1, side]` i64: 0..side, a crop's offsets from its corner.
    offsets: Tensor,
    /// `[1, side]` i64: what mirroring adds to `offsets` (side − 1 − 2d); made once, not per batch,
    /// since each operator is a kernel launch on a GPU.
    mirror_delta: Tensor,
}

impl Resident {
    /// Decodes every image of `ds` (in parallel) and moves them to `device`. Every image must be
    /// `train_size` square (CIFAR); an unreadable one is an error naming it.
    pub fn load(ds: &Arc<dyn Dataset>, cfg: &DataConfig, device: Device) -> Result<Resident> {
        if cfg.pipeline != Pipeline::Cifar {
            bail!("key `data.on_device` supports the CIFAR pipeline (data.pipeline = \"cifar\") only; the ImageNet pipeline's resized crops run in the CPU loader");
        }
        if cfg.train_size != cfg.val_size {
            bail!(
                "key `data.on_device` needs data.train_size = data.val_size (got {} and {})",
                cfg.train_size,
                cfg.val_size
            );
        }
        let side = cfg.train_size as usize;
        let per = side * side * 3;
        let n = ds.len();
        let mut hwc = vec![0u8; n * per];
        let pool = thread_pool(cfg.workers);
        pool.install(|| {
            hwc.par_chunks_mut(per)
                .enumerate()
                .try_for_each(|(i, out)| -> Result<()> {
                    let img = ds.image(i)?;
                    if img.width as usize != side || img.height as usize != side {
                        bail!(
                            "{}: {}x{} image, but data.on_device needs every image at data.train_size ({side}x{side})",
                            ds.describe(i),
                            img.width,
                            img.height
                        );
                    }
                    out.copy_from_slice(&img.rgb);
                    Ok(())
                })
        })?;
        let s = side as i64;
        let images = Tensor::from_slice(&hwc)
            .view([n as i64, s, s, 3])
            .permute([0, 3, 1, 2])
            .contiguous()
            .to_device(device);
        let labels: Vec<i64> = (0..n).map(|i| ds.label(i)).collect();
        let channel = |v: [f64; 3]| {
            Tensor::from_slice(&v.map(|x| x as f32))
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        let offsets = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
        let mirror_delta = offsets.flip([1]) - &offsets;
        let p = cfg.cifar_pad as i64;
        let reflect_index = (cfg.pad_mode == PadMode::Reflect).then(|| {
            let map: Vec<i64> = (-p..s + p)
                .map(|i| pad_index(i, s, PadMode::Reflect).expect("reflection is total"))
                .collect();
            Tensor::from_slice(&map).to_device(device)
        });
        Ok(Resident {
            images,
            offsets,
            mirror_delta,
            labels: Tensor::from_slice(&labels).to_device(device),
            len: n,
            side: s,
            pad: cfg.cifar_pad as i64,
            flip: cfg.flip,
            alternate_flip: cfg.alternate_flip,
            reflect_index,
            mean: channel(cfg.mean),
            std: channel(cfg.std),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn normalise(&self, x: &Tensor) -> Tensor {
        (x.to_kind(Kind::Float) / 255.0 - &self.mean) / &self.std
    }

    /// The training batches of one epoch for `shard` (the same samples, order and augmentation as
    /// [`super::Loader::train_shard`]), from batch `first_batch` on.
    ///
    /// Every random choice of the epoch is drawn here on the host and sent to the device in one
    /// copy: a copy per batch would make the host wait for the device's queue to drain (a
    /// pageable host-to-device copy synchronises), once per step.
    pub fn train_batches(
        self: &Rc<Self>,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first_batch: usize,
        shard: Shard,
    ) -> ResidentBatches {
        let mut order: Vec<usize> = (0..self.len).collect();
        order.shuffle(&mut stream_rng(seed, epoch as u64, 0, TAG_PERM));
        let global = batch_size * shard.world;
        let num_batches = self.len / global;
        let first_batch = first_batch.min(num_batches);
        // Every image is train_size square, so a crop starts anywhere in 0..=2·pad.
        let range = 2 * self.pad as u32;
        let n = (num_batches - first_batch) * batch_size;
        let (flip, alternate_flip) = (self.flip, self.alternate_flip);
        // One ChaCha stream per sample (two with the alternating flip), ~13 ms for CIFAR's 50,000
        // on one core, while the device waits between epochs: spread over the cores.
        let per_sample: Vec<[i64; 4]> = (0..n)
            .into_par_iter()
            .map(|k| {
                let (b, j) = (first_batch + k / batch_size, k % batch_size);
                // The sample's position in the epoch's global order (see Loader::train_shard).
                let pos = b * global + shard.rank * batch_size + j;
                let mut rng = stream_rng(seed, epoch as u64, pos as u64, TAG_SAMPLE);
                // The draws of transforms::random_pad_crop, in its order: x, y, flip.
                let x = rng.gen_range(0..=range) as i64;
                let y = rng.gen_range(0..=range) as i64;
                let flip = Flip::for_sample(flip, alternate_flip, seed, order[pos], epoch);
                [order[pos] as i64, x, y, i64::from(flip.draw(&mut rng))]
            })
            .collect();
        // Rows: image index, crop x, crop y, mirrored (0/1); one column per sample.
        let mut draws = vec![0i64; 4 * n];
        for (k, sample) in per_sample.iter().enumerate() {
            for (row, &v) in sample.iter().enumerate() {
                draws[row * n + k] = v;
            }
        }
        let device = self.images.device();
        ResidentBatches {
            data: self.clone(),
            mode: Mode::Train {
                draws: crate::device::upload(
                    &Tensor::from_slice(&draws).view([4, n as i64]),
                    device,
                ),
            },
            batch_size,
            next: first_batch,
            first: first_batch,
            num_batches,
        }
    }

    /// Evaluation batches in order (every `shard.world`-th image from `shard.rank`), no augmentation.
    pub fn eval_batches(self: &Rc<Self>, batch_size: usize, shard: Shard) -> ResidentBatches {
        let order: Vec<i64> = (shard.rank..self.len)
            .step_by(shard.world)
            .map(|i| i as i64)
            .collect();
        ResidentBatches {
            data: self.clone(),
            num_batches: order.len().div_ceil(batch_size),
            mode: Mode::Eval {
                order: crate::device::upload(&Tensor::from_slice(&order), self.images.device()),
            },
            batch_size,
            next: 0,
            first: 0,
        }
    }

    /// Pad, crop at (x, y) in padded coordinates and mirror the rows of `idx`, on the device;
    /// `xs`, `ys` and `flips` are `[B]` i64 (flips 0/1).
    fn augmented(&self, idx: &Tensor, xs: &Tensor, ys: &Tensor, flips: &Tensor) -> Tensor {
        let (b, s, p) = (idx.size()[0], self.side, self.pad);
        let src = self.images.index_select(0, idx);
        let rows = ys.view([b, 1]) + &self.offsets;
        // Column d of the output is padded column x + d, or x + s − 1 − d when mirrored.
        let cols = xs.view([b, 1]) + &self.offsets + &self.mirror_delta * flips.view([b, 1]);
        // Reflection: padded rows and columns are source rows and columns, so pick from the
        // source directly.
        let (padded, rows, cols, wp) = match &self.reflect_index {
            None => (src.constant_pad_nd([p, p, p, p]), rows, cols, s + 2 * p),
            Some(map) => {
                let through = |t: &Tensor| map.index_select(0, &t.view([-1])).view([b, s]);
                (src, through(&rows), through(&cols), s)
            }
        };
        let picked_rows = padded.gather(
            2,
            &rows.view([b, 1, s, 1]).expand([b, 3, s, wp], false),
            false,
        );
        picked_rows.gather(
            3,
            &cols.view([b, 1, 1, s]).expand([b, 3, s, s], false),
            false,
        )
    }
}

enum Mode {
    /// `[4, N]` i64 on the device: image index, crop x, crop y, mirrored, for each sample of the
    /// batches from `first` on.
    Train { draws: Tensor },
    /// `[N]` i64 image indices on the device.
    Eval { order: Tensor },
}

/// Batches of one pass over a [`Resident`] split; images and labels are on its device.
pub struct ResidentBatches {
    data: Rc<Resident>,
    mode: Mode,
    batch_size: usize,
    next: usize,
    /// The first batch the draws cover.
    first: usize,
    num_batches: usize,
}

impl ResidentBatches {
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }
}

impl Iterator for ResidentBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.num_batches {
            return None;
        }
        let (b, bs) = (self.next, self.batch_size as i64);
        self.next += 1;
        let d = &self.data;
        let (images, idx) = match &self.mode {
            Mode::Train { draws } => {
                let cols = draws.narrow(1, (b - self.first) as i64 * bs, bs);
                let idx = cols.get(0);
                let images = d.augmented(&idx, &cols.get(1), &cols.get(2), &cols.get(3));
                (images, idx)
            }
            Mode::Eval { order } => {
                let from = b as i64 * bs;
                let idx = order.narrow(0, from, bs.min(order.size()[0] - from));
                (d.images.index_select(0, &idx), idx)
            }
        };
        let labels = d.labels.index_select(0, &idx);
        Some(Ok(Batch {
            images: d.normalise(&images),
            labels,
            skipped: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Image, Loader};

    /// Random 8x8 images with labels 0..3.
    struct Synthetic(Vec<Image>);

    impl Dataset for Synthetic {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn classes(&self) -> &[String] {
            &[]
        }
        fn label(&self, index: usize) -> i64 {
            (index % 3) as i64
        }
        fn image(&self, index: usize) -> Result<Image> {
            Ok(self.0[index].clone())
        }
        fn describe(&self, index: usize) -> String {
            format!("image {index}")
        }
    }

    fn dataset(n: usize, side: u32) -> Arc<dyn Dataset> {
        let images = (0..n)
            .map(|i| Image {
                width: side,
                height: side,
                rgb: (0..side * side * 3)
                    .map(|k| ((k as usize * 31 + i * 17) % 256) as u8)
                    .collect(),
            })
            .collect();
        Arc::new(Synthetic(images))
    }

    fn config() -> DataConfig {
        DataConfig {
            pipeline: Pipeline::Cifar,
            train_size: 8,
            val_size: 8,
            val_crop_ratio: 1.0,
            cifar_pad: 2,
            mean: [0.4, 0.5, 0.6],
            std: [0.2, 0.25, 0.3],
            workers: 2,
            ..Default::default()
        }
    }

    /// Training and evaluation batches on the device are the CPU loader's, value for value, for
    /// every shard of a 2-rank run and from a mid-epoch start.
    #[test]
    fn resident_batches_equal_the_cpu_loader() {
        let ds = dataset(23, 8);
        // Also with airbench's reflect padding and alternating flip, over two epochs.
        let airbench = DataConfig {
            pad_mode: PadMode::Reflect,
            alternate_flip: true,
            ..config()
        };
        for (cfg, epochs) in [(config(), vec![3]), (airbench, vec![3, 4])] {
            let resident = Rc::new(Resident::load(&ds, &cfg, Device::Cpu).unwrap());
            for (shard, first, &epoch) in [Shard::SINGLE, Shard { rank: 1, world: 2 }]
                .into_iter()
                .flat_map(|s| [(s, 0), (s, 1)])
                .flat_map(|(s, f)| epochs.iter().map(move |e| (s, f, e)))
            {
                let cpu: Vec<Batch> =
                    Loader::train_shard(ds.clone(), &cfg, 4, 7, epoch, first, shard)
                        .map(|b| b.unwrap())
                        .collect();
                let dev: Vec<Batch> = resident
                    .train_batches(4, 7, epoch, first, shard)
                    .map(|b| b.unwrap())
                    .collect();
                assert_eq!(cpu.len(), dev.len());
                assert!(!cpu.is_empty());
                for (c, d) in cpu.iter().zip(&dev) {
                    assert!(c.labels.equal(&d.labels));
                    assert!(
                        c.images.equal(&d.images),
                        "{shard:?} first {first} {:?}",
                        cfg.pad_mode
                    );
                }
            }
        }
        let cfg = config();
        let resident = Rc::new(Resident::load(&ds, &cfg, Device::Cpu).unwrap());
        for shard in [Shard::SINGLE, Shard { rank: 1, world: 2 }] {
            let cpu: Vec<Batch> = Loader::eval_shard(ds.clone(), &cfg, 5, shard)
                .map(|b| b.unwrap())
                .collect();
            let dev: Vec<Batch> = resident
                .eval_batches(5, shard)
                .map(|b| b.unwrap())
                .collect();
            assert_eq!(cpu.len(), dev.len());
            for (c, d) in cpu.iter().zip(&dev) {
                assert!(c.labels.equal(&d.labels) && c.images.equal(&d.images));
            }
        }
        // Some samples really are flipped and shifted (the test is not trivially about identity).
        let b = resident
            .train_batches(23, 7, 3, 0, Shard::SINGLE)
            .next()
            .unwrap()
            .unwrap();
        let plain = resident.normalise(&resident.images);
        assert!(!b
            .images
            .equal(&plain.index_select(0, &Tensor::from_slice(&[0i64]))));
    }

    #[test]
    fn wrong_sizes_and_pipelines_are_errors() {
        let cfg = config();
        let err = Resident::load(&dataset(3, 10), &cfg, Device::Cpu)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("image 0: 10x10 image"),
            "{err:#}"
        );
        let imagenet = DataConfig {
            pipeline: Pipeline::Imagenet,
            ..config()
        };
        let err = Resident::load(&dataset(3, 8), &imagenet, Device::Cpu)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("CIFAR pipeline"), "{err:#}");
    }
}
