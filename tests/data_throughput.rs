//! Loader throughput on a real dataset (ignored by default: it needs local data and minutes).
//!
//! `TRICKS_BENCH_DATA=/path/to/data cargo test --release --test data_throughput -- --ignored --nocapture`
//! where the folder holds `cifar10/{train,test}` and/or `imagenette2-160/{train,val}` ImageFolder trees.
//! `TRICKS_BENCH_LIMIT_CIFAR` / `TRICKS_BENCH_LIMIT_IMAGENET` cap the images per pass (defaults 10000 / 2000);
//! `TRICKS_BENCH_WORKERS` lists the worker counts to run (default "1,2"; bench/loader_per_core.sh
//! pins the process to one core and runs 1).

mod common;

use common::env_or;
use std::path::PathBuf;
use std::time::Instant;
use tricks::config::{DataConfig, Pipeline};
use tricks::data::{self, Loader, Split};

/// User + system CPU seconds of this process so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the ")" that ends the command name: state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

#[test]
#[ignore]
fn loader_throughput() {
    let Ok(root) = std::env::var("TRICKS_BENCH_DATA") else {
        eprintln!("TRICKS_BENCH_DATA not set; nothing measured");
        return;
    };
    let root = PathBuf::from(root);
    let worker_counts: Vec<usize> = std::env::var("TRICKS_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|w| {
            w.trim()
                .parse()
                .expect("TRICKS_BENCH_WORKERS: numbers, comma-separated")
        })
        .collect();
    let cases = [
        (
            "CIFAR pipeline, cifar10/train (32 px)",
            "cifar10",
            Pipeline::Cifar,
            32,
            env_or::<usize>("TRICKS_BENCH_LIMIT_CIFAR", 10_000),
            256,
        ),
        (
            "ImageNet pipeline, imagenette2-160/train (224 px)",
            "imagenette2-160",
            Pipeline::Imagenet,
            224,
            env_or::<usize>("TRICKS_BENCH_LIMIT_IMAGENET", 2_000),
            64,
        ),
    ];
    for (name, sub, pipeline, size, limit, bs) in cases {
        let dir = root.join(sub);
        if !dir.is_dir() {
            eprintln!("{name}: {} missing, skipped", dir.display());
            continue;
        }
        for cache in [false, true] {
            for &workers in &worker_counts {
                let cfg = DataConfig {
                    dir: dir.display().to_string(),
                    pipeline,
                    train_size: size,
                    val_size: size,
                    workers,
                    prefetch: 4,
                    cache,
                    train_limit: limit,
                    ..DataConfig::default()
                };
                let t = Instant::now();
                let ds = data::open_split(&cfg, Split::Train, 0).unwrap();
                let open_s = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let cpu0 = cpu_seconds();
                let mut n = 0usize;
                for b in Loader::train(ds.clone(), &cfg, bs, 0, 1) {
                    n += b.unwrap().len();
                }
                let s = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                println!(
                    "{name}: cache={cache} workers={workers}: {n} images in {s:.2} s = {:.0} img/s wall; \
                     {cpu:.2} CPU s = {:.0} img/s per busy core; open{} {open_s:.2} s",
                    n as f64 / s,
                    n as f64 / cpu.max(1e-9),
                    if cache { " + decode into cache" } else { "" },
                );
            }
        }
    }
}

#[test]
#[ignore]
fn transform_micro() {
    use rand::SeedableRng;
    use tricks::data::transforms::Transform;
    use tricks::data::Image;
    let img = Image {
        width: 213,
        height: 160,
        rgb: (0..213 * 160 * 3).map(|i| (i % 251) as u8).collect(),
    };
    for pipeline in [Pipeline::Imagenet, Pipeline::Cifar] {
        let size = if pipeline == Pipeline::Cifar { 32 } else { 224 };
        let small = Image {
            width: 32,
            height: 32,
            rgb: vec![7; 32 * 32 * 3],
        };
        let src = if pipeline == Pipeline::Cifar {
            &small
        } else {
            &img
        };
        let t = Transform::new(&DataConfig {
            pipeline,
            train_size: size,
            val_size: size,
            ..DataConfig::default()
        });
        let mut out = vec![0f32; t.train_len()];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let n = if pipeline == Pipeline::Cifar {
            100_000
        } else {
            1000
        };
        let s = Instant::now();
        for _ in 0..n {
            t.train_into(src, &mut rng, &mut out);
        }
        println!(
            "{pipeline:?}: {:.1} us/img train transform",
            s.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}

/// Writes a contact sheet of augmented training samples (denormalised) to
/// `$TRICKS_BENCH_SHEET` (default /tmp/tricks_aug.png), for a visual check.
#[test]
#[ignore]
fn augmentation_contact_sheet() {
    let Ok(root) = std::env::var("TRICKS_BENCH_DATA") else {
        return;
    };
    let out = std::env::var("TRICKS_BENCH_SHEET").unwrap_or_else(|_| "/tmp/tricks_aug.png".into());
    let cfg = DataConfig {
        dir: PathBuf::from(root)
            .join("imagenette2-160")
            .display()
            .to_string(),
        pipeline: Pipeline::Imagenet,
        train_size: 224,
        val_size: 224,
        train_limit: 40,
        ..DataConfig::default()
    };
    let (train, val) = data::open_train_val(&cfg, 0).unwrap();
    println!(
        "classes {:?}, train {}, val {}",
        train.classes(),
        train.len(),
        val.len()
    );
    let b = Loader::train(train, &cfg, 8, 0, 1).next().unwrap().unwrap();
    let e = Loader::eval(val, &cfg, 8).next().unwrap().unwrap();
    let mut sheet = image::RgbImage::new(224 * 8, 224 * 2);
    for (row, t) in [&b.images, &e.images].into_iter().enumerate() {
        for i in 0..8 {
            for c in 0..3usize {
                let plane = Vec::<f32>::try_from(t.get(i).get(c as i64).flatten(0, -1)).unwrap();
                for (p, v) in plane.iter().enumerate() {
                    let x = (p % 224) as u32 + 224 * i as u32;
                    let y = (p / 224) as u32 + 224 * row as u32;
                    let u = (v * cfg.std[c] as f32 + cfg.mean[c] as f32) * 255.0;
                    sheet.get_pixel_mut(x, y)[c] = u.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    sheet.save(&out).unwrap();
    println!("wrote {out}");
}
