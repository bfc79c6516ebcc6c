//! Dataset layouts, errors, limits, cache and bad images, on tiny generated trees.

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb};
use std::path::{Path, PathBuf};
use tricks::config::{DataConfig, DataFormat, Pipeline};
use tricks::data::{self, Dataset, Loader, Split};

fn write_png(path: &Path, w: u32, h: u32, value: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = ImageBuffer::from_fn(w, h, |x, y| Rgb([value, (x * 3) as u8, (y * 5) as u8]));
    DynamicImage::ImageRgb8(img)
        .save_with_format(path, ImageFormat::Png)
        .unwrap();
}

fn write_grey_jpeg(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = ImageBuffer::from_fn(w, h, |_, _| Luma([100u8]));
    DynamicImage::ImageLuma8(img)
        .save_with_format(path, ImageFormat::Jpeg)
        .unwrap();
}

/// root/{train,val}/{classes}/ with `n` PNGs per class (value = 10·class + i) plus clutter.
fn tree(root: &Path, classes: &[&str], n: usize) {
    for split in ["train", "val"] {
        for (c, name) in classes.iter().enumerate() {
            for i in 0..n {
                write_png(
                    &root.join(split).join(name).join(format!("img{i}.png")),
                    8,
                    6,
                    (10 * c + i) as u8,
                );
            }
            std::fs::write(
                root.join(split).join(name).join("notes.txt"),
                "not an image",
            )
            .unwrap();
        }
    }
}

fn cfg(dir: &Path) -> DataConfig {
    DataConfig {
        dir: dir.display().to_string(),
        pipeline: Pipeline::Cifar,
        train_size: 8,
        val_size: 8,
        workers: 2,
        prefetch: 2,
        ..DataConfig::default()
    }
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn imagefolder_opens_with_sorted_classes_labels_and_pixels() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &["dog", "cat"], 3);
    // Upper-case extensions and nested folders count; other files and hidden files are ignored.
    write_grey_jpeg(&dir.path().join("train/cat/sub/deep.JPG"), 8, 8);
    write_png(&dir.path().join("train/dog/UPPER.PNG"), 4, 4, 1);
    std::fs::write(dir.path().join("train/dog/._hidden.jpg"), b"resource fork").unwrap();
    std::fs::write(dir.path().join("train/dog/data.csv"), b"1,2").unwrap();
    let (train, val) = data::open_train_val(&cfg(dir.path()), 0).unwrap();
    assert_eq!(train.classes(), ["cat", "dog"]);
    assert_eq!(val.classes(), ["cat", "dog"]);
    assert_eq!(train.len(), 8);
    assert_eq!(val.len(), 6);
    let labels: Vec<i64> = (0..train.len()).map(|i| train.label(i)).collect();
    assert_eq!(labels, [0, 0, 0, 0, 1, 1, 1, 1]);
    // Files sorted by path: cat/img0..2, cat/sub/deep.JPG, dog/UPPER.PNG, dog/img0..2.
    assert!(
        train.describe(3).ends_with("deep.JPG"),
        "{}",
        train.describe(3)
    );
    let img = train.image(1).unwrap();
    assert_eq!((img.width, img.height), (8, 6));
    assert_eq!(img.pixel(2, 3), [11, 6, 15]); // cat is class 1 of the tree: value 10·1 + 1
    let grey = train.image(3).unwrap();
    assert_eq!(grey.rgb.len(), 8 * 8 * 3);
    assert!(grey.rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    assert!(val.describe(0).contains("val"));
}

#[test]
fn test_folder_is_the_evaluation_split_without_val() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &["a", "b"], 1);
    std::fs::rename(dir.path().join("val"), dir.path().join("test")).unwrap();
    let ds = data::open_split(&cfg(dir.path()), Split::Val, 0).unwrap();
    assert_eq!(ds.len(), 2);
    assert!(ds.describe(0).contains("test"));
}

#[test]
fn layout_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let missing = root.join("nope");
    let e = err_of(data::open_train_val(&cfg(&missing), 0));
    assert!(e.contains("does not exist") && e.contains("nope"), "{e}");

    // No train/ folder (auto: names the expected layouts; explicit ImageFolder: names train/).
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let e = err_of(data::open_train_val(&cfg(&root.join("empty")), 0));
    assert!(
        e.contains("no train/ folder") && e.contains("empty") && e.contains("data_batch_1..5.bin"),
        "{e}"
    );
    let mut c = cfg(&root.join("empty"));
    c.format = DataFormat::ImageFolder;
    let e = err_of(data::open_train_val(&c, 0));
    assert!(
        e.contains("no train/ folder in") && e.contains("empty"),
        "{e}"
    );

    // No class folders.
    std::fs::create_dir_all(root.join("noclass/train")).unwrap();
    std::fs::write(root.join("noclass/train/x.jpg"), b"").unwrap();
    let e = err_of(data::open_split(
        &cfg(&root.join("noclass")),
        Split::Train,
        0,
    ));
    assert!(
        e.contains("no class folders in") && e.contains("noclass/train"),
        "{e}"
    );

    // Empty class folder (only non-images in it).
    tree(&root.join("emptyclass"), &["a", "b"], 1);
    std::fs::create_dir_all(root.join("emptyclass/train/c")).unwrap();
    std::fs::write(root.join("emptyclass/train/c/readme.md"), b"x").unwrap();
    let e = err_of(data::open_train_val(&cfg(&root.join("emptyclass")), 0));
    assert!(
        e.contains("empty class folder") && e.contains("emptyclass/train/c"),
        "{e}"
    );

    // Different class sets: the differing classes are named.
    tree(&root.join("diff"), &["a", "b", "c"], 1);
    std::fs::rename(root.join("diff/val/c"), root.join("diff/val/zebra")).unwrap();
    let e = err_of(data::open_train_val(&cfg(&root.join("diff")), 0));
    assert!(
        e.contains("different class sets")
            && e.contains("only in train: [c]")
            && e.contains("[zebra]"),
        "{e}"
    );

    // No val/ or test/.
    tree(&root.join("noval"), &["a"], 1);
    std::fs::remove_dir_all(root.join("noval/val")).unwrap();
    let e = err_of(data::open_train_val(&cfg(&root.join("noval")), 0));
    assert!(
        e.contains("no val/ or test/ folder") && e.contains("noval"),
        "{e}"
    );

    // Explicit CIFAR format on an ImageFolder tree.
    let mut c = cfg(&root.join("diff"));
    c.format = DataFormat::Cifar10;
    let e = err_of(data::open_train_val(&c, 0));
    assert!(
        e.contains("no CIFAR-10 binary files") && e.contains("diff"),
        "{e}"
    );
}

/// A CIFAR record: label byte(s), then 1024 R, 1024 G, 1024 B.
fn record(labels: &[u8], seed: u32) -> Vec<u8> {
    let mut r = labels.to_vec();
    for c in 0..3u32 {
        for p in 0..1024u32 {
            r.push(((p * 13 + c * 71 + seed * 29) % 256) as u8);
        }
    }
    r
}

#[test]
fn cifar10_binary_round_trips_in_the_archive_subfolder() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut seed = 0;
    for b in 1..=5 {
        let mut bytes = Vec::new();
        for _ in 0..2 {
            bytes.extend(record(&[(seed % 10) as u8], seed));
            seed += 1;
        }
        std::fs::write(bin.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(
        bin.join("test_batch.bin"),
        [record(&[9], 100), record(&[4], 101)].concat(),
    )
    .unwrap();
    std::fs::write(
        bin.join("batches.meta.txt"),
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    )
    .unwrap();
    let (train, val) = data::open_train_val(&cfg(dir.path()), 0).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(val.len(), 2);
    assert_eq!(train.classes().len(), 10);
    assert_eq!(train.classes()[0], "airplane");
    for i in 0..10 {
        assert_eq!(train.label(i), (i % 10) as i64);
        let img = train.image(i).unwrap();
        assert_eq!((img.width, img.height), (32, 32));
        for (x, y) in [(0, 0), (31, 0), (5, 17), (31, 31)] {
            let p = y * 32 + x;
            let expect = [0u32, 1, 2].map(|c| ((p * 13 + c * 71 + i as u32 * 29) % 256) as u8);
            assert_eq!(img.pixel(x, y), expect, "sample {i} pixel ({x}, {y})");
        }
    }
    assert_eq!((val.label(0), val.label(1)), (9, 4));
    assert!(
        train.describe(3).ends_with("data_batch_2.bin record 1"),
        "{}",
        train.describe(3)
    );
    assert!(val.describe(1).ends_with("test_batch.bin record 1"));

    // The eval loader of the CIFAR pipeline returns exactly the normalised pixels.
    let c = DataConfig {
        train_size: 32,
        val_size: 32,
        ..cfg(dir.path())
    };
    let batch = Loader::eval(val.clone(), &c, 8).next().unwrap().unwrap();
    assert_eq!(batch.images.size(), [2, 3, 32, 32]);
    let v = batch.images.double_value(&[1, 2, 0, 5]); // sample 1, blue, y = 0, x = 5
    let raw = ((5 * 13 + 2 * 71 + 101 * 29) % 256) as f64;
    assert!((v - (raw / 255.0 - 0.406) / 0.225).abs() < 1e-5, "{v}");
    assert_eq!(Vec::<i64>::try_from(&batch.labels).unwrap(), [9, 4]);
}

#[test]
fn cifar100_binary_uses_fine_labels() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train.bin"),
        [record(&[3, 77], 0), record(&[19, 99], 1)].concat(),
    )
    .unwrap();
    std::fs::write(dir.path().join("test.bin"), record(&[0, 5], 2)).unwrap();
    let mut c = cfg(dir.path());
    c.format = DataFormat::Cifar100;
    let (train, val) = data::open_train_val(&c, 0).unwrap();
    assert_eq!(train.classes().len(), 100);
    assert_eq!((train.label(0), train.label(1), val.label(0)), (77, 99, 5));
    assert_eq!(train.classes()[99], "worm");
    assert_eq!(train.image(1).unwrap().pixel(1, 0), [42, 113, 184]);
    // Auto-detected too.
    let (train, _) = data::open_train_val(&cfg(dir.path()), 0).unwrap();
    assert_eq!(train.len(), 2);
}

#[test]
fn cifar_bad_record_size_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("data_batch_1.bin"),
        [record(&[1], 0), vec![0u8; 100]].concat(),
    )
    .unwrap();
    std::fs::write(dir.path().join("test_batch.bin"), record(&[1], 0)).unwrap();
    let e = err_of(data::open_train_val(&cfg(dir.path()), 0));
    assert!(
        e.contains("data_batch_1.bin") && e.contains("3173 bytes") && e.contains("3073"),
        "{e}"
    );

    let d100 = dir.path().join("c100");
    std::fs::create_dir(&d100).unwrap();
    std::fs::write(d100.join("train.bin"), vec![0u8; 3073]).unwrap();
    std::fs::write(d100.join("test.bin"), vec![0u8; 3074]).unwrap();
    let e = err_of(data::open_train_val(&cfg(&d100), 0));
    assert!(e.contains("train.bin") && e.contains("3074"), "{e}");

    // A missing test file is named.
    let half = dir.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("data_batch_1.bin"), record(&[1], 0)).unwrap();
    let e = err_of(data::open_train_val(&cfg(&half), 0));
    assert!(e.contains("no test_batch.bin"), "{e}");
}

#[test]
fn limits_give_seeded_class_balanced_subsets() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &["a", "b", "c"], 4);
    let mut c = cfg(dir.path());
    c.train_limit = 6;
    c.val_limit = 3;
    let (train, val) = data::open_train_val(&c, 1).unwrap();
    assert_eq!((train.len(), val.len()), (6, 3));
    let mut per = [0; 3];
    for i in 0..train.len() {
        per[train.label(i) as usize] += 1;
    }
    assert_eq!(per, [2, 2, 2]);
    let names = |ds: &dyn Dataset| (0..ds.len()).map(|i| ds.describe(i)).collect::<Vec<_>>();
    let (again, _) = data::open_train_val(&c, 1).unwrap();
    assert_eq!(names(train.as_ref()), names(again.as_ref()));
    let seeds_differ = (2..6)
        .any(|s| names(data::open_train_val(&c, s).unwrap().0.as_ref()) != names(train.as_ref()));
    assert!(seeds_differ);
    // A limit at or above the size keeps everything.
    c.train_limit = 100;
    assert_eq!(data::open_split(&c, Split::Train, 1).unwrap().len(), 12);
}

#[test]
fn cache_holds_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), &["a", "b"], 3);
    let plain = data::open_split(&cfg(dir.path()), Split::Train, 0).unwrap();
    let mut c = cfg(dir.path());
    c.cache = true;
    let cached = data::open_split(&c, Split::Train, 0).unwrap();
    let expect: Vec<Vec<u8>> = (0..plain.len())
        .map(|i| plain.image(i).unwrap().rgb)
        .collect();
    // The files can go: the cache does not read them again.
    std::fs::remove_dir_all(dir.path().join("train")).unwrap();
    assert_eq!(cached.len(), plain.len());
    for (i, rgb) in expect.iter().enumerate() {
        assert_eq!(&cached.image(i).unwrap().rgb, rgb);
        assert_eq!(cached.label(i), plain.label(i));
        assert_eq!(cached.describe(i), plain.describe(i));
    }
    assert!(plain.image(0).is_err());
}

/// A tree whose class `b` holds three bad images among good ones.
fn bad_tree(root: &Path) -> Vec<PathBuf> {
    tree(root, &["a", "b"], 2);
    let b = root.join("train/b");
    let png = std::fs::read(b.join("img0.png")).unwrap();
    let bad = vec![
        b.join("empty.jpg"),
        b.join("text.jpg"),
        b.join("truncated.png"),
    ];
    std::fs::write(&bad[0], b"").unwrap();
    std::fs::write(&bad[1], b"this is a text file named like an image").unwrap();
    std::fs::write(&bad[2], &png[..png.len() / 2]).unwrap();
    bad
}

#[test]
fn bad_images_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = bad_tree(dir.path());
    let ds = data::open_split(&cfg(dir.path()), Split::Train, 0).unwrap();
    assert_eq!(ds.len(), 7);
    let msgs: Vec<String> = (0..ds.len())
        .filter_map(|i| ds.image(i).err().map(|e| format!("{e:#}")))
        .collect();
    assert_eq!(msgs.len(), 3);
    assert!(
        msgs.iter()
            .any(|m| m.contains("empty.jpg") && m.contains("empty file")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("text.jpg") && m.contains("not a JPEG or PNG")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("truncated.png") && m.contains("Png decoding failed")),
        "{msgs:?}"
    );

    // The loader stops with the first bad file of the pass.
    let mut loader = Loader::eval(ds.clone(), &cfg(dir.path()), 16);
    let e = format!("{:#}", loader.next().unwrap().unwrap_err());
    assert!(
        e.contains(&bad[0].display().to_string()) && e.contains("skip_bad_images"),
        "{e}"
    );
    assert!(loader.next().is_none());

    // With cache and without skipping, opening fails.
    let mut c = cfg(dir.path());
    c.cache = true;
    let e = err_of(data::open_split(&c, Split::Train, 0));
    assert!(e.contains("bad image") && e.contains("train/b/"), "{e}");
}

#[test]
fn skip_mode_drops_and_counts_bad_images() {
    let dir = tempfile::tempdir().unwrap();
    bad_tree(dir.path());
    for cache in [false, true] {
        let mut c = cfg(dir.path());
        c.skip_bad_images = true;
        c.cache = cache;
        let ds = data::open_split(&c, Split::Train, 0).unwrap();
        // Eval: order a0 a1 | b/empty b/img0 | b/img1 b/text | b/truncated.
        let batches: Vec<_> = Loader::eval(ds.clone(), &c, 2)
            .map(|b| b.unwrap())
            .collect();
        let rows: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        let skipped: Vec<usize> = batches.iter().map(|b| b.skipped).collect();
        assert_eq!(rows, [2, 1, 1, 0], "cache {cache}");
        assert_eq!(skipped, [0, 1, 1, 1], "cache {cache}");
        for b in &batches {
            assert_eq!(b.images.size(), [b.len() as i64, 3, 8, 8]);
        }
        // Train: every epoch counts all three.
        let total: usize = Loader::train(ds.clone(), &c, 3, 0, 1)
            .map(|b| b.unwrap().skipped)
            .sum();
        let rows: usize = Loader::train(ds, &c, 3, 0, 1)
            .map(|b| b.unwrap().len())
            .sum();
        // 7 samples, batch 3, drop_last: 6 samples in the pass.
        assert_eq!(rows + total, 6);
    }
}
