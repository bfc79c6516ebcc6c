//! Segmentation datasets: `root/<split>/images/*.{jpg,jpeg,png}`, each with a mask
//! `root/<split>/masks/<same stem>.png` of 8-bit class ids (greyscale PNG, same size as the image).
//!
//! Images decode as the classification data does (JPEG/PNG, decompression-bomb limits, greyscale
//! expanded to RGB); masks must be 8-bit single-channel PNGs (a palette, RGB or 16-bit PNG is an
//! error naming the file: its values are not class ids). Every error names the file.

use crate::config::{Config, Task};
use crate::data::imagefolder::{decode_limits, load_image};
use crate::data::{has_image_extension, Image, Split};
use crate::train::derive_seed;
use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageFormat, ImageReader};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A mask of class ids, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Mask {
    /// A mask filled with `value`.
    pub fn new(width: u32, height: u32, value: u8) -> Mask {
        Mask {
            width,
            height,
            data: vec![value; width as usize * height as usize],
        }
    }

    /// Builds a mask from row-major values; panics if the length does not match.
    pub fn from_vec(width: u32, height: u32, data: Vec<u8>) -> Mask {
        assert_eq!(
            data.len(),
            width as usize * height as usize,
            "mask buffer size"
        );
        Mask {
            width,
            height,
            data,
        }
    }

    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }
}

/// Decodes a mask PNG; the error is the problem in words, without the file name.
pub fn decode_mask(bytes: &[u8]) -> std::result::Result<Mask, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => {}
        Ok(other) => {
            return Err(format!(
                "{other:?} file: masks must be PNG (lossless 8-bit class ids)"
            ))
        }
        Err(_) => return Err("not a PNG file".into()),
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png);
    reader.limits(decode_limits());
    let img = reader
        .decode()
        .map_err(|e| format!("PNG decoding failed: {e}"))?;
    match img {
        DynamicImage::ImageLuma8(m) => {
            let (width, height) = m.dimensions();
            Ok(Mask {
                width,
                height,
                data: m.into_raw(),
            })
        }
        other => Err(format!(
            "not an 8-bit single-channel mask (its pixels are {:?}); masks hold one 8-bit class id per pixel \
             (save palette or RGB masks as 8-bit greyscale class ids)",
            other.color()
        )),
    }
}

/// Reads and decodes one mask file; the error names the file.
pub fn load_mask(path: &Path) -> Result<Mask> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read mask file {}", path.display()))?;
    decode_mask(&bytes).map_err(|e| anyhow::anyhow!("bad mask {}: {e}", path.display()))
}

/// One split of a segmentation dataset: image/mask path pairs, optionally decoded in memory.
pub struct SegDataset {
    images: Vec<PathBuf>,
    masks: Vec<PathBuf>,
    cache: Option<Vec<(Image, Mask)>>,
    skipped: Vec<(PathBuf, String)>,
}

impl SegDataset {
    /// Lists `dir/images` and pairs every image with `dir/masks/<stem>.png`. Hidden files and
    /// files without a jpg/jpeg/png extension are ignored. A missing mask, a missing folder or
    /// two images with the same stem are errors naming the file.
    pub fn open(dir: &Path) -> Result<SegDataset> {
        let img_dir = dir.join("images");
        let mask_dir = dir.join("masks");
        if !img_dir.is_dir() {
            bail!(
                "no images/ folder in {} (a segmentation split holds images/*.jpg|png and masks/<stem>.png)",
                dir.display()
            );
        }
        let mut images = Vec::new();
        let mut skipped = Vec::new();
        for e in std::fs::read_dir(&img_dir)
            .with_context(|| format!("cannot list {}", img_dir.display()))?
        {
            let p = e
                .with_context(|| format!("cannot list {}", img_dir.display()))?
                .path();
            let hidden = p
                .file_name()
                .map(|n| n.to_string_lossy().starts_with('.'))
                .unwrap_or(true);
            if hidden || !has_image_extension(&p) {
                continue;
            }
            // An image name that is not a readable file is said, not skipped silently.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => images.push(p),
                Ok(_) => skipped.push((p, "a folder, not an image".to_string())),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    skipped.push((p, "symbolic link loop".to_string()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    skipped.push((p, "dangling symbolic link".to_string()))
                }
                Err(e) => skipped.push((p, format!("cannot read: {e}"))),
            }
        }
        images.sort();
        skipped.sort();
        if !skipped.is_empty() {
            let names: Vec<String> = skipped
                .iter()
                .take(10)
                .map(|(p, why)| format!("{} ({why})", p.display()))
                .collect();
            eprintln!(
                "warning: {}: skipped {} entr{}: {}{}",
                img_dir.display(),
                skipped.len(),
                if skipped.len() == 1 { "y" } else { "ies" },
                names.join(", "),
                if skipped.len() > 10 { ", …" } else { "" }
            );
        }
        if images.is_empty() {
            bail!("{}: no images (jpg, jpeg or png)", img_dir.display());
        }
        let mut masks = Vec::with_capacity(images.len());
        let mut stems = std::collections::BTreeMap::new();
        for img in &images {
            let stem = img
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            if let Some(other) = stems.insert(stem.clone(), img.clone()) {
                bail!(
                    "{} and {} have the same stem `{stem}`, so they would share the mask masks/{stem}.png",
                    other.display(),
                    img.display()
                );
            }
            let mask = mask_dir.join(format!("{stem}.png"));
            if !mask.is_file() {
                bail!(
                    "missing mask for image {}: expected {}",
                    img.display(),
                    mask.display()
                );
            }
            masks.push(mask);
        }
        Ok(SegDataset {
            images,
            masks,
            cache: None,
            skipped,
        })
    }

    /// Entries of `images/` with an image name that are not readable image files (symbolic link
    /// loops, dangling links, folders), each with its reason; also printed as a warning by `open`.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn image_path(&self, index: usize) -> &Path {
        &self.images[index]
    }

    pub fn mask_path(&self, index: usize) -> &Path {
        &self.masks[index]
    }

    /// The decoded image and mask; a bad file or a size mismatch is an error naming the file.
    pub fn sample(&self, index: usize) -> Result<(Image, Mask)> {
        if let Some(cache) = &self.cache {
            return Ok(cache[index].clone());
        }
        let img = load_image(&self.images[index])?;
        let mask = load_mask(&self.masks[index])?;
        if (img.width, img.height) != (mask.width, mask.height) {
            bail!(
                "mask {} is {}x{} but its image {} is {}x{}",
                self.masks[index].display(),
                mask.width,
                mask.height,
                self.images[index].display(),
                img.width,
                img.height
            );
        }
        Ok((img, mask))
    }

    /// A seeded random subset of `limit` pairs (kept in file order); all when `limit` is 0 or
    /// not smaller than the dataset.
    pub fn limit(mut self, limit: usize, seed: u64, stream: u64) -> SegDataset {
        if limit == 0 || limit >= self.len() {
            return self;
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(derive_seed(
            seed,
            "segment-subset",
            stream,
            0,
        )));
        idx.truncate(limit);
        idx.sort_unstable();
        self.images = idx.iter().map(|&i| self.images[i].clone()).collect();
        self.masks = idx.iter().map(|&i| self.masks[i].clone()).collect();
        self
    }

    /// Decodes every pair once (in parallel, `workers` threads, 0 = all cores) into memory.
    pub fn cached(mut self, workers: usize) -> Result<SegDataset> {
        let pool = crate::data::loader::thread_pool(workers);
        let this = &self;
        let decoded: Vec<Result<(Image, Mask)>> = pool.install(|| {
            (0..this.len())
                .into_par_iter()
                .map(|i| this.sample(i))
                .collect()
        });
        self.cache = Some(decoded.into_iter().collect::<Result<Vec<_>>>()?);
        Ok(self)
    }
}

/// The folder of a split: `train/`, and `val/` (else `test/`) for evaluation.
pub fn split_dir(root: &Path, split: Split) -> Result<PathBuf> {
    let names: &[&str] = match split {
        Split::Train => &["train"],
        Split::Val => &["val", "test"],
    };
    for n in names {
        let d = root.join(n);
        if d.is_dir() {
            return Ok(d);
        }
    }
    bail!(
        "{}: no {} folder (a segmentation dataset holds train/ and val/, each with images/ and masks/)",
        root.display(),
        names.join("/ or ") + "/"
    )
}

/// Opens one split of `data.dir`, with `data.train_limit` / `data.val_limit` and `data.cache`.
pub fn open_split(cfg: &Config, split: Split) -> Result<Arc<SegDataset>> {
    debug_assert_eq!(cfg.task, Task::Segmentation);
    if cfg.data.dir.is_empty() {
        bail!("no dataset directory given (key `data.dir` / --data is empty)");
    }
    let root = Path::new(&cfg.data.dir);
    if !root.is_dir() {
        bail!(
            "dataset directory {} does not exist or is not a folder",
            root.display()
        );
    }
    let dir = split_dir(root, split)?;
    let (limit, stream) = match split {
        Split::Train => (cfg.data.train_limit, 0),
        Split::Val => (cfg.data.val_limit, 1),
    };
    let mut ds = SegDataset::open(&dir)?.limit(limit, cfg.seed, stream);
    if cfg.data.cache {
        ds = ds.cached(cfg.data.workers)?;
    }
    Ok(Arc::new(ds))
}

/// Opens the training and evaluation splits of `data.dir`.
pub fn open_train_val(cfg: &Config) -> Result<(Arc<SegDataset>, Arc<SegDataset>)> {
    Ok((open_split(cfg, Split::Train)?, open_split(cfg, Split::Val)?))
}
