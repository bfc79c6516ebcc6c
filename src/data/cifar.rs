//! CIFAR-10 / CIFAR-100 in the published binary format.
//!
//! A CIFAR-10 record is 1 label byte + 1024 R + 1024 G + 1024 B bytes (3073 bytes, rows top to
//! bottom); a CIFAR-100 record is a coarse label byte, a fine label byte and the same 3072 pixel bytes
//! (3074 bytes); the fine label is used. Files: `data_batch_1..5.bin` + `test_batch.bin`
//! (CIFAR-10) or `train.bin` + `test.bin` (CIFAR-100), in the given folder or in the archive's
//! `cifar-10-batches-bin/` / `cifar-100-binary/` subfolder. The whole split is read into memory
//! (150 MB for the CIFAR-10 training set), so `data.cache` has nothing to add.

use super::{Dataset, Image, Split};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const SIDE: u32 = 32;
pub const PIXELS: usize = 32 * 32;

/// The CIFAR-10 class names (label order of the binary files, also alphabetical).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The CIFAR-100 fine class names (label order of the binary files, also alphabetical).
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        }
    }
    /// Bytes per record: label byte(s) + 3072 pixel bytes.
    pub fn record_size(self) -> usize {
        self.label_bytes() + 3 * PIXELS
    }
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }
    pub fn expected_files(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "data_batch_1..5.bin + test_batch.bin",
            CifarKind::Cifar100 => "train.bin + test.bin",
        }
    }
    /// The folder the official archive extracts to.
    pub fn archive_folder(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            CifarKind::Cifar100 => "cifar-100-binary",
        }
    }
    fn meta_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        }
    }
    fn builtin_classes(self) -> Vec<String> {
        match self {
            CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            CifarKind::Cifar100 => CIFAR100_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Where the binary files of one CIFAR dataset are.
#[derive(Clone, Debug)]
pub struct CifarLayout {
    pub kind: CifarKind,
    /// The folder holding the .bin files.
    pub dir: PathBuf,
    pub train: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
}

/// `data_batch_<n>.bin` files of `dir`, sorted by n.
fn data_batches(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("cannot list folder {}", dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_prefix("data_batch_")
            .and_then(|r| r.strip_suffix(".bin"))
        {
            if let Ok(n) = n.parse::<u32>() {
                found.push((n, path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

fn find_in(dir: &Path, kind: CifarKind) -> Result<Option<CifarLayout>> {
    match kind {
        CifarKind::Cifar10 => {
            let train = data_batches(dir)?;
            let test = dir.join("test_batch.bin");
            match (train.is_empty(), test.is_file()) {
                (true, false) => Ok(None),
                (true, true) => bail!(
                    "{}: test_batch.bin but no data_batch_1..5.bin training files",
                    dir.display()
                ),
                (false, false) => {
                    bail!("{}: data_batch_*.bin but no test_batch.bin", dir.display())
                }
                (false, true) => Ok(Some(CifarLayout {
                    kind,
                    dir: dir.to_path_buf(),
                    train,
                    test: vec![test],
                })),
            }
        }
        CifarKind::Cifar100 => {
            let train = dir.join("train.bin");
            let test = dir.join("test.bin");
            match (train.is_file(), test.is_file()) {
                (false, false) => Ok(None),
                (true, false) => bail!("{}: train.bin but no test.bin", dir.display()),
                (false, true) => bail!("{}: test.bin but no train.bin", dir.display()),
                (true, true) => Ok(Some(CifarLayout {
                    kind,
                    dir: dir.to_path_buf(),
                    train: vec![train],
                    test: vec![test],
                })),
            }
        }
    }
}

/// Looks for CIFAR binary files in `root` and in its `cifar-10-batches-bin/` and
/// `cifar-100-binary/` subfolders. `kind = None` accepts either dataset.
pub fn find_layout(root: &Path, kind: Option<CifarKind>) -> Result<Option<CifarLayout>> {
    let kinds: Vec<CifarKind> = match kind {
        Some(k) => vec![k],
        None => vec![CifarKind::Cifar10, CifarKind::Cifar100],
    };
    let dirs = [
        root.to_path_buf(),
        root.join(CifarKind::Cifar10.archive_folder()),
        root.join(CifarKind::Cifar100.archive_folder()),
    ];
    for dir in dirs.iter().filter(|d| d.is_dir()) {
        for &k in &kinds {
            if let Some(layout) = find_in(dir, k)? {
                return Ok(Some(layout));
            }
        }
    }
    Ok(None)
}

/// The class names: the archive's label-name file when it has the right number of names, else the
/// published names.
fn class_names(dir: &Path, kind: CifarKind) -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(kind.meta_file())) {
        let names: Vec<String> = text
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if names.len() == kind.num_classes() {
            return names;
        }
    }
    kind.builtin_classes()
}

/// One split of CIFAR-10/100, held in memory as the raw records.
pub struct CifarDataset {
    kind: CifarKind,
    classes: Vec<String>,
    /// Every record of every file, concatenated.
    data: Vec<u8>,
    /// (file, index of its first record).
    files: Vec<(PathBuf, usize)>,
    len: usize,
}

impl CifarDataset {
    pub fn open(layout: &CifarLayout, split: Split) -> Result<CifarDataset> {
        let files = match split {
            Split::Train => &layout.train,
            Split::Val => &layout.test,
        };
        Self::from_files(layout.kind, files, class_names(&layout.dir, layout.kind))
    }

    /// Reads the given record files (checking sizes and labels).
    pub fn from_files(
        kind: CifarKind,
        paths: &[PathBuf],
        classes: Vec<String>,
    ) -> Result<CifarDataset> {
        let rs = kind.record_size();
        let mut data = Vec::new();
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.is_empty() || bytes.len() % rs != 0 {
                bail!(
                    "{}: size {} bytes is not a multiple of the {} record size {} bytes ({} label byte{} + 3072 \
                     pixel bytes); the file is truncated or not a {} binary file",
                    path.display(),
                    bytes.len(),
                    kind.name(),
                    rs,
                    kind.label_bytes(),
                    if kind.label_bytes() == 1 { "" } else { "s" },
                    kind.name()
                );
            }
            let first = data.len() / rs;
            for (r, rec) in bytes.chunks_exact(rs).enumerate() {
                let (label, max) = match kind {
                    CifarKind::Cifar10 => (rec[0], 10),
                    CifarKind::Cifar100 => {
                        if rec[0] >= 20 {
                            bail!(
                                "{} record {r}: coarse label {} is out of range 0..20",
                                path.display(),
                                rec[0]
                            );
                        }
                        (rec[1], 100)
                    }
                };
                if label as usize >= max {
                    bail!(
                        "{} record {r}: label {label} is out of range 0..{max}",
                        path.display()
                    );
                }
            }
            data.extend_from_slice(&bytes);
            files.push((path.clone(), first));
        }
        let len = data.len() / rs;
        Ok(CifarDataset {
            kind,
            classes,
            data,
            files,
            len,
        })
    }

    pub fn kind(&self) -> CifarKind {
        self.kind
    }

    fn record(&self, index: usize) -> &[u8] {
        let rs = self.kind.record_size();
        &self.data[index * rs..(index + 1) * rs]
    }

    /// The file holding record `index` and the record number within it.
    pub fn locate(&self, index: usize) -> (&Path, usize) {
        let f = self.files.partition_point(|(_, first)| *first <= index) - 1;
        (&self.files[f].0, index - self.files[f].1)
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.len
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> i64 {
        self.record(index)[self.kind.label_bytes() - 1] as i64
    }
    fn image(&self, index: usize) -> Result<Image> {
        let px = &self.record(index)[self.kind.label_bytes()..];
        let (r, rest) = px.split_at(PIXELS);
        let (g, b) = rest.split_at(PIXELS);
        let mut rgb = vec![0u8; 3 * PIXELS];
        for (i, p) in rgb.chunks_exact_mut(3).enumerate() {
            p[0] = r[i];
            p[1] = g[i];
            p[2] = b[i];
        }
        Ok(Image {
            width: SIDE,
            height: SIDE,
            rgb,
        })
    }
    fn describe(&self, index: usize) -> String {
        let (path, r) = self.locate(index);
        format!("{} record {r}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_are_sorted_and_complete() {
        assert_eq!(CIFAR100_CLASSES.len(), 100);
        assert!(CIFAR100_CLASSES.windows(2).all(|w| w[0] < w[1]));
        assert!(CIFAR10_CLASSES.windows(2).all(|w| w[0] < w[1]));
    }

    fn record(kind: CifarKind, label: u8, seed: u8) -> Vec<u8> {
        let mut r = Vec::new();
        if kind == CifarKind::Cifar100 {
            r.push(label / 5);
        }
        r.push(label);
        for c in 0..3u32 {
            for p in 0..PIXELS as u32 {
                r.push((p * 7 + c * 50 + seed as u32) as u8);
            }
        }
        r
    }

    #[test]
    fn records_round_trip_across_files() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [CifarKind::Cifar10, CifarKind::Cifar100] {
            let a = dir.path().join(format!("{kind:?}_a.bin"));
            let b = dir.path().join(format!("{kind:?}_b.bin"));
            std::fs::write(&a, [record(kind, 3, 0), record(kind, 9, 1)].concat()).unwrap();
            std::fs::write(&b, record(kind, 7, 2)).unwrap();
            let ds =
                CifarDataset::from_files(kind, &[a.clone(), b.clone()], kind.builtin_classes())
                    .unwrap();
            assert_eq!(ds.len(), 3);
            assert_eq!((ds.label(0), ds.label(1), ds.label(2)), (3, 9, 7));
            assert_eq!(ds.describe(2), format!("{} record 0", b.display()));
            assert_eq!(ds.describe(1), format!("{} record 1", a.display()));
            let img = ds.image(1).unwrap();
            assert_eq!((img.width, img.height), (32, 32));
            // Pixel (x=5, y=2): p = 69.
            let p = 2 * 32 + 5;
            assert_eq!(
                img.pixel(5, 2),
                [(p * 7 + 1) as u8, (p * 7 + 51) as u8, (p * 7 + 101) as u8]
            );
        }
    }

    #[test]
    fn bad_sizes_and_labels_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data_batch_1.bin");
        std::fs::write(&f, vec![0u8; 3074]).unwrap();
        let e = CifarDataset::from_files(CifarKind::Cifar10, std::slice::from_ref(&f), vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("3074") && e.contains("3073"),
            "{e}"
        );
        std::fs::write(&f, vec![0u8; 3073]).unwrap();
        let e = CifarDataset::from_files(CifarKind::Cifar100, std::slice::from_ref(&f), vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("3074") && e.contains("CIFAR-100"), "{e}");
        let mut r = record(CifarKind::Cifar10, 10, 0);
        r.extend(record(CifarKind::Cifar10, 1, 0));
        std::fs::write(&f, [record(CifarKind::Cifar10, 1, 0), r].concat()).unwrap();
        let e = CifarDataset::from_files(CifarKind::Cifar10, std::slice::from_ref(&f), vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("record 1") && e.contains("label 10"), "{e}");
    }
}
