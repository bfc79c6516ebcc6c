//! Data: datasets (ImageFolder, CIFAR binary), transforms, and the parallel loader.
//!
//! * [`open_train_val`] / [`open_split`] find and check the dataset layout under `data.dir`
//!   (ImageFolder or the CIFAR-10/100 binary files), apply the seeded class-balanced
//!   `train_limit` / `val_limit` subsets and, with `data.cache`, decode everything once into memory.
//! * [`transforms`] holds the augmentations as pure functions on [`Image`].
//! * [`Loader`] turns a dataset into normalised `[B,3,H,W]` batches, decoding and augmenting with a
//!   dedicated rayon pool and prefetching on a background thread. Every random choice is drawn from
//!   a ChaCha RNG keyed by (seed, epoch, position in the epoch), so batches do not depend on the
//!   number of threads.

pub mod cifar;
pub mod download;
pub mod imagefolder;
pub mod loader;
pub mod prefetch;
pub mod resident;
pub mod transforms;

pub use loader::{repeated_samples_per_rank, Batch, Loader, Mode, Pass, Plan, Repeated, Shard};
pub use resident::{Resident, ResidentBatches};

/// The batches of one pass, from the CPU loader or from a device-resident dataset.
pub enum Batches {
    Loader(Loader),
    Resident(ResidentBatches),
}

impl Batches {
    pub fn num_batches(&self) -> usize {
        match self {
            Batches::Loader(l) => l.num_batches(),
            Batches::Resident(r) => r.num_batches(),
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        match self {
            Batches::Loader(l) => l.next(),
            Batches::Resident(r) => r.next(),
        }
    }
}

use crate::config::{DataConfig, DataFormat};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An RGB image, row-major HWC u8.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// A black image.
    pub fn new(width: u32, height: u32) -> Image {
        Image {
            width,
            height,
            rgb: vec![0; width as usize * height as usize * 3],
        }
    }

    /// Builds an image from HWC RGB bytes; panics if the length does not match.
    pub fn from_rgb(width: u32, height: u32, rgb: Vec<u8>) -> Image {
        assert_eq!(
            rgb.len(),
            width as usize * height as usize * 3,
            "RGB buffer size"
        );
        Image { width, height, rgb }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sorted class names; label = index.
    fn classes(&self) -> &[String];
    fn label(&self, index: usize) -> i64;
    /// The decoded image; the error message names the file and the problem.
    fn image(&self, index: usize) -> Result<Image>;
    /// Where the sample comes from, e.g. the file path, or "data_batch_1.bin record 17".
    fn describe(&self, index: usize) -> String;
    /// Entries of the dataset's folder that were not taken as samples although they might have
    /// been (symbolic link loops, dangling links, folders listed twice), each with its reason.
    fn skipped_files(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The dataset layouts [`open_split`] understands.
#[derive(Clone, Debug)]
enum Layout {
    ImageFolder { root: PathBuf },
    Cifar(cifar::CifarLayout),
}

fn detect_layout(cfg: &DataConfig) -> Result<Layout> {
    if cfg.dir.is_empty() {
        bail!("no dataset directory given (key `data.dir` / --data is empty)");
    }
    let root = PathBuf::from(&cfg.dir);
    let meta = std::fs::metadata(&root).with_context(|| {
        format!(
            "dataset directory {} does not exist or cannot be read",
            root.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("dataset path {} is not a directory", root.display());
    }
    match cfg.format {
        DataFormat::ImageFolder => {
            if !root.join("train").is_dir() {
                bail!(
                    "no train/ folder in {} (an ImageFolder root holds train/ and val/ or test/, \
                     each with one folder per class)",
                    root.display()
                );
            }
            Ok(Layout::ImageFolder { root })
        }
        DataFormat::Cifar10 | DataFormat::Cifar100 => {
            let kind = if cfg.format == DataFormat::Cifar10 {
                cifar::CifarKind::Cifar10
            } else {
                cifar::CifarKind::Cifar100
            };
            Ok(Layout::Cifar(
                cifar::find_layout(&root, Some(kind))?.with_context(|| {
                    format!(
                        "no {} binary files in {} (looked for {} there and in its {} subfolder)",
                        kind.name(),
                        root.display(),
                        kind.expected_files(),
                        kind.archive_folder()
                    )
                })?,
            ))
        }
        DataFormat::Coco | DataFormat::Voc | DataFormat::Yolo => bail!(
            "key `data.format`: {:?} is an annotation format of detection (set task = \"detection\")",
            cfg.format
        ),
        DataFormat::Auto => {
            if root.join("train").is_dir() {
                return Ok(Layout::ImageFolder { root });
            }
            if let Some(layout) = cifar::find_layout(&root, None)? {
                return Ok(Layout::Cifar(layout));
            }
            bail!(
                "{}: no train/ folder and no CIFAR binary files; expected an ImageFolder root \
                 (train/ and val/ or test/, each with one folder per class) or the CIFAR binary files \
                 (data_batch_1..5.bin + test_batch.bin for CIFAR-10, train.bin + test.bin for CIFAR-100)",
                root.display()
            )
        }
    }
}

fn open_raw(layout: &Layout, split: Split) -> Result<Arc<dyn Dataset>> {
    Ok(match layout {
        Layout::ImageFolder { root } => {
            let dir = match split {
                Split::Train => root.join("train"),
                Split::Val => imagefolder::val_dir(root)?,
            };
            Arc::new(imagefolder::ImageFolder::open(&dir)?)
        }
        Layout::Cifar(l) => Arc::new(cifar::CifarDataset::open(l, split)?),
    })
}

/// Applies the split's limit and the cache to an opened dataset.
fn finish(
    ds: Arc<dyn Dataset>,
    cfg: &DataConfig,
    split: Split,
    seed: u64,
    in_memory: bool,
) -> Result<Arc<dyn Dataset>> {
    let limit = match split {
        Split::Train => cfg.train_limit,
        Split::Val => cfg.val_limit,
    };
    let ds = if limit > 0 && limit < ds.len() {
        let tag = match split {
            Split::Train => 0,
            Split::Val => 1,
        };
        Arc::new(Subset::balanced(ds, limit, seed, tag)) as Arc<dyn Dataset>
    } else {
        ds
    };
    if cfg.cache && !in_memory {
        Ok(Arc::new(CachedDataset::new(
            ds.as_ref(),
            cfg.workers,
            cfg.skip_bad_images,
        )?))
    } else {
        Ok(ds)
    }
}

/// Opens one split of `cfg.dir` (see [`open_train_val`]).
pub fn open_split(cfg: &DataConfig, split: Split, seed: u64) -> Result<Arc<dyn Dataset>> {
    let layout = detect_layout(cfg)?;
    let ds = open_raw(&layout, split)?;
    finish(ds, cfg, split, seed, matches!(layout, Layout::Cifar(_)))
        .with_context(|| format!("cannot open the {} split of {}", split.name(), cfg.dir))
}

/// Opens the train and evaluation splits of `cfg.dir` (ImageFolder: `train/` and `val/` or `test/`;
/// CIFAR-10/100 binary files as published: data_batch_1..5.bin + test_batch.bin, or train.bin + test.bin for
/// CIFAR-100, possibly inside a `cifar-10-batches-bin/` subfolder). Checks the layout and that both splits
/// have the same class set; applies data.train_limit / data.val_limit (seeded, class-balanced subset);
/// with data.cache decodes everything once (in parallel) into memory.
pub fn open_train_val(cfg: &DataConfig, seed: u64) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    let layout = detect_layout(cfg)?;
    let train = open_raw(&layout, Split::Train)?;
    let val = open_raw(&layout, Split::Val)?;
    check_same_classes(train.as_ref(), val.as_ref(), &layout)?;
    let in_memory = matches!(layout, Layout::Cifar(_));
    let train = finish(train, cfg, Split::Train, seed, in_memory)
        .with_context(|| format!("cannot open the train split of {}", cfg.dir))?;
    let val = finish(val, cfg, Split::Val, seed, in_memory)
        .with_context(|| format!("cannot open the val split of {}", cfg.dir))?;
    Ok((train, val))
}

fn check_same_classes(train: &dyn Dataset, val: &dyn Dataset, layout: &Layout) -> Result<()> {
    if train.classes() == val.classes() {
        return Ok(());
    }
    let root = match layout {
        Layout::ImageFolder { root } => root.display().to_string(),
        Layout::Cifar(l) => l.dir.display().to_string(),
    };
    bail!(
        "{root}: the train and evaluation splits have different class sets ({}",
        class_difference(
            train.classes(),
            val.classes(),
            "train",
            "the evaluation split"
        )
    )
}

/// How two class lists differ, for a message: "3 vs 3 classes); only in A: [x]; only in B: [y]"
/// (or, with the same names, that their order differs).
pub fn class_difference(a: &[String], b: &[String], a_name: &str, b_name: &str) -> String {
    let only = |x: &[String], y: &[String]| -> String {
        x.iter()
            .filter(|c| !y.contains(c))
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (only_a, only_b) = (only(a, b), only(b, a));
    if only_a.is_empty() && only_b.is_empty() {
        return format!(
            "{} vs {} classes); the same names in another order: [{}] vs [{}]",
            a.len(),
            b.len(),
            a.join(", "),
            b.join(", ")
        );
    }
    format!(
        "{} vs {} classes); only in {a_name}: [{only_a}]; only in {b_name}: [{only_b}]",
        a.len(),
        b.len()
    )
}

/// The RNG of one random stream: ChaCha8 keyed by (seed, a, b, tag), so streams never collide.
pub(crate) fn stream_rng(seed: u64, a: u64, b: u64, tag: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&a.to_le_bytes());
    key[16..24].copy_from_slice(&b.to_le_bytes());
    key[24..32].copy_from_slice(&tag.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

pub(crate) const TAG_SUBSET: u64 = 0x5355_4253_4554; // "SUBSET"
pub(crate) const TAG_PERM: u64 = 0x5045_524d; // "PERM"
pub(crate) const TAG_SAMPLE: u64 = 0x5341_4d50_4c45; // "SAMPLE"
pub(crate) const TAG_FLIP: u64 = 0x464c_4950; // "FLIP"

/// A subset of another dataset, in the order of `indices`.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Subset {
        assert!(
            indices.iter().all(|&i| i < inner.len()),
            "subset index out of range"
        );
        Subset { inner, indices }
    }

    /// A seeded, class-balanced subset of `limit` samples (every class gets ⌊limit/K⌋ or ⌈limit/K⌉,
    /// classes with too few samples give their share to the others), kept in the original order.
    pub fn balanced(inner: Arc<dyn Dataset>, limit: usize, seed: u64, stream: u64) -> Subset {
        let indices = balanced_indices(inner.as_ref(), limit, seed, stream);
        Subset { inner, indices }
    }

    /// The indices into the wrapped dataset.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

pub(crate) fn balanced_indices(
    ds: &dyn Dataset,
    limit: usize,
    seed: u64,
    stream: u64,
) -> Vec<usize> {
    let n = ds.len();
    if limit >= n {
        return (0..n).collect();
    }
    let k = ds.classes().len().max(1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); k];
    for i in 0..n {
        let l = ds.label(i);
        let l = if l >= 0 && (l as usize) < k {
            l as usize
        } else {
            0
        };
        by_class[l].push(i);
    }
    let mut rng = stream_rng(seed, stream, 0, TAG_SUBSET);
    for c in by_class.iter_mut() {
        c.shuffle(&mut rng);
    }
    let mut order: Vec<usize> = (0..k).collect();
    order.shuffle(&mut rng);
    let mut take = vec![0usize; k];
    let mut remaining = limit;
    while remaining > 0 {
        let mut progress = false;
        for &c in &order {
            if remaining == 0 {
                break;
            }
            if take[c] < by_class[c].len() {
                take[c] += 1;
                remaining -= 1;
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    let mut out: Vec<usize> = by_class
        .iter()
        .zip(&take)
        .flat_map(|(c, &t)| c[..t].iter().copied())
        .collect();
    out.sort_unstable();
    out
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
    fn label(&self, index: usize) -> i64 {
        self.inner.label(self.indices[index])
    }
    fn image(&self, index: usize) -> Result<Image> {
        self.inner.image(self.indices[index])
    }
    fn describe(&self, index: usize) -> String {
        self.inner.describe(self.indices[index])
    }
    fn skipped_files(&self) -> Vec<String> {
        self.inner.skipped_files()
    }
}

/// A dataset decoded once into memory (u8 RGB at the original size).
///
/// Without `skip_bad_images` a bad image fails [`CachedDataset::new`]; with it, the error is kept
/// and returned again by `image()`, so the loader counts the sample as skipped exactly as it would
/// without the cache.
pub struct CachedDataset {
    classes: Vec<String>,
    labels: Vec<i64>,
    describes: Vec<String>,
    images: Vec<std::result::Result<Image, String>>,
    skipped: Vec<String>,
}

impl CachedDataset {
    pub fn new(ds: &dyn Dataset, workers: usize, keep_errors: bool) -> Result<CachedDataset> {
        let pool = loader::thread_pool(workers);
        let images: Vec<std::result::Result<Image, String>> = pool.install(|| {
            (0..ds.len())
                .into_par_iter()
                .map(|i| ds.image(i).map_err(|e| format!("{e:#}")))
                .collect()
        });
        if !keep_errors {
            if let Some(e) = images.iter().find_map(|r| r.as_ref().err()) {
                bail!("{e} (set data.skip_bad_images = true to skip unreadable images)");
            }
        }
        Ok(CachedDataset {
            classes: ds.classes().to_vec(),
            labels: (0..ds.len()).map(|i| ds.label(i)).collect(),
            describes: (0..ds.len()).map(|i| ds.describe(i)).collect(),
            images,
            skipped: ds.skipped_files(),
        })
    }

    /// Number of images that failed to decode (kept as errors).
    pub fn num_bad(&self) -> usize {
        self.images.iter().filter(|r| r.is_err()).count()
    }

    /// Bytes held by the decoded pixels.
    pub fn bytes(&self) -> usize {
        self.images
            .iter()
            .map(|r| r.as_ref().map_or(0, |i| i.rgb.len()))
            .sum()
    }
}

impl Dataset for CachedDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> i64 {
        self.labels[index]
    }
    fn image(&self, index: usize) -> Result<Image> {
        match &self.images[index] {
            Ok(img) => Ok(img.clone()),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }
    fn describe(&self, index: usize) -> String {
        self.describes[index].clone()
    }
    fn skipped_files(&self) -> Vec<String> {
        self.skipped.clone()
    }
}

/// Is `path` a file name the ImageFolder reader treats as an image (jpg/jpeg/png, any case)?
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| {
            let e = e.to_ascii_lowercase();
            e == "jpg" || e == "jpeg" || e == "png"
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Toy {
        classes: Vec<String>,
        labels: Vec<i64>,
    }
    impl Dataset for Toy {
        fn len(&self) -> usize {
            self.labels.len()
        }
        fn classes(&self) -> &[String] {
            &self.classes
        }
        fn label(&self, i: usize) -> i64 {
            self.labels[i]
        }
        fn image(&self, i: usize) -> Result<Image> {
            Ok(Image::from_rgb(1, 1, vec![i as u8; 3]))
        }
        fn describe(&self, i: usize) -> String {
            format!("toy {i}")
        }
    }

    fn toy(counts: &[usize]) -> Arc<dyn Dataset> {
        let mut labels = Vec::new();
        for (c, &n) in counts.iter().enumerate() {
            labels.extend(std::iter::repeat_n(c as i64, n));
        }
        Arc::new(Toy {
            classes: (0..counts.len()).map(|c| format!("c{c}")).collect(),
            labels,
        })
    }

    #[test]
    fn balanced_subset_is_balanced_seeded_and_sorted() {
        let ds = toy(&[10, 10, 10, 10]);
        let a = balanced_indices(ds.as_ref(), 12, 7, 0);
        assert_eq!(a.len(), 12);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        let mut per = [0; 4];
        for &i in &a {
            per[ds.label(i) as usize] += 1;
        }
        assert_eq!(per, [3, 3, 3, 3]);
        assert_eq!(a, balanced_indices(ds.as_ref(), 12, 7, 0));
        assert_ne!(a, balanced_indices(ds.as_ref(), 12, 8, 0));
        assert_ne!(a, balanced_indices(ds.as_ref(), 12, 7, 1));
        // 14 = 4 + 4 + 3 + 3.
        let mut per = [0; 4];
        for &i in &balanced_indices(ds.as_ref(), 14, 7, 0) {
            per[ds.label(i) as usize] += 1;
        }
        per.sort();
        assert_eq!(per, [3, 3, 4, 4]);
        // The small class gives its share to the others.
        let ds = toy(&[10, 10, 10, 2]);
        let b = balanced_indices(ds.as_ref(), 20, 1, 0);
        let mut per = [0; 4];
        for &i in &b {
            per[ds.label(i) as usize] += 1;
        }
        assert_eq!(per[3], 2);
        assert_eq!(per.iter().sum::<usize>(), 20);
        assert!(per[..3].iter().all(|&p| p == 6));
        assert_eq!(balanced_indices(ds.as_ref(), 100, 1, 0).len(), 32);
    }

    #[test]
    fn subset_forwards() {
        let ds = toy(&[3, 3]);
        let s = Subset::new(ds, vec![1, 4]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.label(1), 1);
        assert_eq!(s.describe(0), "toy 1");
        assert_eq!(s.image(1).unwrap().rgb, vec![4, 4, 4]);
    }

    #[test]
    fn stream_rng_differs_per_key() {
        use rand::RngCore;
        let a = stream_rng(1, 2, 3, 4).next_u64();
        assert_eq!(a, stream_rng(1, 2, 3, 4).next_u64());
        assert_ne!(a, stream_rng(1, 2, 4, 4).next_u64());
        assert_ne!(a, stream_rng(1, 3, 3, 4).next_u64());
        assert_ne!(a, stream_rng(2, 2, 3, 4).next_u64());
    }

    #[test]
    fn image_extensions() {
        for ok in ["a.jpg", "a.JPEG", "b/c.Png", "x.jpeg"] {
            assert!(has_image_extension(Path::new(ok)), "{ok}");
        }
        for no in ["a.txt", "a", "a.jpg.txt", "a.gif", "a.bin"] {
            assert!(!has_image_extension(Path::new(no)), "{no}");
        }
    }
}
