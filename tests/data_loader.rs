//! The loader: batch shapes and values, order, determinism across thread counts, prefetch and
//! early drop, panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tricks::config::{DataConfig, Pipeline};
use tricks::data::{Dataset, Image, Loader};

/// Image i: a `w` x `h` gradient whose red channel at (0, 0) is i; label i.
struct Synthetic {
    n: usize,
    w: u32,
    h: u32,
    classes: Vec<String>,
    delay: Duration,
    calls: AtomicUsize,
    panic_at: Option<usize>,
}

impl Synthetic {
    fn new(n: usize, w: u32, h: u32) -> Synthetic {
        Synthetic {
            n,
            w,
            h,
            classes: (0..n).map(|i| format!("c{i:03}")).collect(),
            delay: Duration::ZERO,
            calls: AtomicUsize::new(0),
            panic_at: None,
        }
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> i64 {
        index as i64
    }
    fn image(&self, index: usize) -> anyhow::Result<Image> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if Some(index) == self.panic_at {
            panic!("synthetic dataset panics on {index}");
        }
        std::thread::sleep(self.delay);
        let mut rgb = Vec::with_capacity((self.w * self.h * 3) as usize);
        for y in 0..self.h {
            for x in 0..self.w {
                rgb.extend_from_slice(&[
                    (index as u32 + x + y) as u8,
                    (x * 7) as u8,
                    (y * 11 + 3 * index as u32) as u8,
                ]);
            }
        }
        Ok(Image {
            width: self.w,
            height: self.h,
            rgb,
        })
    }
    fn describe(&self, index: usize) -> String {
        format!("synthetic {index}")
    }
}

fn imagenet_cfg(workers: usize) -> DataConfig {
    DataConfig {
        pipeline: Pipeline::Imagenet,
        train_size: 16,
        val_size: 16,
        workers,
        prefetch: 2,
        ..DataConfig::default()
    }
}

fn cifar_cfg(workers: usize) -> DataConfig {
    DataConfig {
        pipeline: Pipeline::Cifar,
        train_size: 12,
        val_size: 12,
        cifar_pad: 2,
        workers,
        prefetch: 2,
        ..DataConfig::default()
    }
}

fn collect(loader: Loader) -> Vec<(Tensor, Vec<i64>)> {
    loader
        .map(|b| {
            let b = b.unwrap();
            (b.images, Vec::<i64>::try_from(&b.labels).unwrap())
        })
        .collect()
}

fn same(a: &[(Tensor, Vec<i64>)], b: &[(Tensor, Vec<i64>)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.1 == y.1 && x.0.equal(&y.0))
}

#[test]
fn deterministic_across_thread_counts_and_seeded() {
    for (name, cfg1, cfg2) in [
        ("imagenet", imagenet_cfg(1), imagenet_cfg(2)),
        ("cifar", cifar_cfg(1), cifar_cfg(2)),
    ] {
        let (w, h) = if name == "cifar" { (12, 12) } else { (23, 17) };
        let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(21, w, h));
        let one = collect(Loader::train(ds.clone(), &cfg1, 4, 7, 3));
        let two = collect(Loader::train(ds.clone(), &cfg2, 4, 7, 3));
        assert_eq!(one.len(), 5);
        assert!(same(&one, &two), "{name}: 1 vs 2 threads");
        let mut cfg0 = cfg2.clone();
        cfg0.prefetch = 0;
        assert!(
            same(&one, &collect(Loader::train(ds.clone(), &cfg0, 4, 7, 3))),
            "{name}: prefetch 0"
        );
        let other_seed = collect(Loader::train(ds.clone(), &cfg2, 4, 8, 3));
        let other_epoch = collect(Loader::train(ds.clone(), &cfg2, 4, 7, 4));
        assert!(!same(&one, &other_seed), "{name}: seed");
        assert!(!same(&one, &other_epoch), "{name}: epoch");
        // Same order but different augmentation when only the images differ? The permutation
        // depends on (seed, epoch): two epochs give different orders.
        let order =
            |v: &[(Tensor, Vec<i64>)]| v.iter().flat_map(|b| b.1.clone()).collect::<Vec<_>>();
        assert_ne!(order(&one), order(&other_epoch));
        for (t, _) in &one {
            assert_eq!(
                t.size(),
                [4, 3, cfg1.train_size as i64, cfg1.train_size as i64]
            );
            assert_eq!(t.kind(), tch::Kind::Float);
        }
    }
}

#[test]
fn train_is_a_drop_last_permutation_and_eval_is_in_order() {
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(10, 12, 12));
    let cfg = cifar_cfg(2);
    let loader = Loader::train(ds.clone(), &cfg, 3, 0, 1);
    assert_eq!((loader.num_batches(), loader.num_samples()), (3, 9));
    let labels: Vec<i64> = collect(loader).into_iter().flat_map(|b| b.1).collect();
    assert_eq!(labels.len(), 9);
    let mut sorted = labels.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 9, "no sample twice in an epoch");
    assert_ne!(labels, (0..9).collect::<Vec<i64>>(), "shuffled");

    let loader = Loader::eval(ds.clone(), &cfg, 4);
    assert_eq!((loader.num_batches(), loader.num_samples()), (3, 10));
    let batches = collect(loader);
    let sizes: Vec<i64> = batches.iter().map(|b| b.0.size()[0]).collect();
    assert_eq!(sizes, [4, 4, 2]);
    let labels: Vec<i64> = batches.iter().flat_map(|b| b.1.clone()).collect();
    assert_eq!(labels, (0..10).collect::<Vec<i64>>());
    // Eval of a val_size image with the CIFAR pipeline = normalised pixels: sample 9, red (0, 0) = 9.
    let v = batches[2].0.double_value(&[1, 0, 0, 0]);
    assert!((v - (9.0 / 255.0 - 0.485) / 0.229).abs() < 1e-6, "{v}");
    // Green at (x = 3, y = 0) = 21.
    let v = batches[2].0.double_value(&[1, 1, 0, 3]);
    assert!((v - (21.0 / 255.0 - 0.456) / 0.224).abs() < 1e-6, "{v}");

    // Fewer samples than a batch: no training batch, one evaluation batch.
    let small: Arc<dyn Dataset> = Arc::new(Synthetic::new(2, 12, 12));
    assert_eq!(Loader::train(small.clone(), &cfg, 3, 0, 1).count(), 0);
    assert_eq!(Loader::eval(small, &cfg, 3).count(), 1);
}

#[test]
fn imagenet_eval_shape_and_resize() {
    let ds: Arc<dyn Dataset> = Arc::new(Synthetic::new(3, 40, 30));
    let cfg = imagenet_cfg(2);
    let b = Loader::eval(ds, &cfg, 8).next().unwrap().unwrap();
    assert_eq!(b.images.size(), [3, 3, 16, 16]);
    assert_eq!(b.skipped, 0);
    let mean = b.images.mean(tch::Kind::Float).double_value(&[]);
    assert!(mean.is_finite());
}

#[test]
fn early_drop_stops_the_prefetch_thread() {
    let mut s = Synthetic::new(400, 12, 12);
    s.delay = Duration::from_millis(2);
    let ds = Arc::new(s);
    let dyn_ds: Arc<dyn Dataset> = ds.clone();
    let mut cfg = cifar_cfg(2);
    cfg.prefetch = 2;
    let mut loader = Loader::train(dyn_ds.clone(), &cfg, 4, 0, 0);
    assert_eq!(loader.num_batches(), 100);
    loader.next().unwrap().unwrap();
    let t = Instant::now();
    drop(loader);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        t.elapsed()
    );
    let after_drop = ds.calls.load(Ordering::SeqCst);
    // At most the consumed batch + the prefetched ones + the one in progress.
    assert!(after_drop <= 4 * (1 + 2 + 2), "{after_drop} images decoded");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ds.calls.load(Ordering::SeqCst),
        after_drop,
        "the producer still runs after drop"
    );

    // Dropped before anything was consumed, and an eval loader dropped mid-way.
    let before = ds.calls.load(Ordering::SeqCst);
    drop(Loader::train(dyn_ds.clone(), &cfg, 4, 0, 1));
    let mut ev = Loader::eval(dyn_ds, &cfg, 4);
    ev.next().unwrap().unwrap();
    ev.next().unwrap().unwrap();
    drop(ev);
    let settled = ds.calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ds.calls.load(Ordering::SeqCst), settled);
    assert!(settled - before < 400);
}

#[test]
fn a_panicking_dataset_is_an_error_not_a_hang() {
    let mut s = Synthetic::new(12, 12, 12);
    s.panic_at = Some(6);
    let ds: Arc<dyn Dataset> = Arc::new(s);
    let results: Vec<_> = Loader::eval(ds, &cifar_cfg(2), 4).collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    let e = format!("{:#}", results[1].as_ref().unwrap_err());
    assert!(e.contains("panicked") && e.contains("panics on 6"), "{e}");
}
