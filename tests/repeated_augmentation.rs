//! Repeated augmentation (`data.repeats`): the sampler against torchvision's `RASampler` (its
//! `__iter__` written out below), coverage and lengths, epochs, different draws for the copies
//! of an image, the config key, and training runs.

mod common;

use std::sync::Arc;
use tch::Tensor;
use tricks::config::{Config, DataConfig, Pipeline};
use tricks::data::{repeated_samples_per_rank, Dataset, Image, Loader, Plan, Shard};

/// torchvision's `references/classification/sampler.py` `RASampler.__iter__` for rank `rank` of
/// `world`, on the epoch's shuffled `indices`:
///
/// ```python
/// indices = [ele for ele in indices for i in range(self.repetitions)]
/// indices += indices[: (self.total_size - len(indices))]
/// indices = indices[self.rank : self.total_size : self.num_replicas]
/// return iter(indices[: self.num_selected_samples])
/// ```
///
/// with `num_samples = ceil(len * repetitions / world)`, `total_size = num_samples * world` and
/// `num_selected_samples = floor(len // 256 * 256 / world)`.
fn ra_sampler(indices: &[usize], repetitions: usize, rank: usize, world: usize) -> Vec<usize> {
    let len = indices.len();
    let num_samples = (len * repetitions).div_ceil(world);
    let total_size = num_samples * world;
    let num_selected = ((len / 256 * 256) as f64 / world as f64).floor() as usize;
    let mut repeated: Vec<usize> = indices
        .iter()
        .flat_map(|&e| std::iter::repeat_n(e, repetitions))
        .collect();
    let pad: Vec<usize> = repeated[..total_size - repeated.len()].to_vec();
    repeated.extend(pad);
    let mine: Vec<usize> = repeated[rank..total_size]
        .iter()
        .step_by(world)
        .copied()
        .collect();
    assert_eq!(mine.len(), num_samples);
    mine[..num_selected].to_vec()
}

fn shuffled(len: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut v: Vec<usize> = (0..len).collect();
    v.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    v
}

#[test]
fn each_rank_takes_rasamplers_share_and_every_kept_index_appears_repeats_times() {
    for (len, repeats, world) in [
        (256, 3, 1),
        (1000, 3, 1),
        (1000, 3, 2),
        (1000, 2, 3),
        (777, 4, 8),
        (5000, 3, 4),
        (513, 1, 2),
        (300, 5, 7),
    ] {
        let perm = shuffled(len, len as u64);
        let kept = repeated_samples_per_rank(len, world);
        assert_eq!(kept, len / 256 * 256 / world, "torchvision's formula");
        let mut counts = vec![0usize; len];
        for rank in 0..world {
            let shard = Shard { rank, world };
            // Batches of 1: nothing is dropped, the plan is the sampler's list.
            let plan = Plan::train_repeated(&perm, repeats, 1, 7, 1, 0, shard);
            let want = ra_sampler(&perm, repeats, rank, world);
            assert_eq!(
                plan.order, want,
                "len {len}, ×{repeats}, rank {rank}/{world}"
            );
            assert_eq!(plan.num_batches, kept);
            for &i in &plan.order {
                counts[i] += 1;
            }
            // Batches of 8 are the list cut, the last partial one dropped.
            let batched = Plan::train_repeated(&perm, repeats, 8, 7, 1, 0, shard);
            assert_eq!(batched.num_batches, kept / 8);
            assert_eq!(batched.order[..], want[..kept / 8 * 8]);
        }
        // Across the ranks the epoch is the repeated list's first world·kept entries: every index
        // in it `repeats` times, but the last one, which may be cut.
        let total = world * kept;
        assert_eq!(counts.iter().sum::<usize>(), total);
        let whole = total / repeats;
        for (k, &i) in perm.iter().enumerate() {
            let want = match k.cmp(&whole) {
                std::cmp::Ordering::Less => repeats,
                std::cmp::Ordering::Equal => total % repeats,
                std::cmp::Ordering::Greater => 0,
            };
            assert_eq!(
                counts[i], want,
                "len {len}, ×{repeats}, world {world}: index {i}"
            );
        }
    }
}

#[test]
fn copies_get_their_own_positions_and_alternate_their_flips() {
    let perm = shuffled(600, 1);
    for world in [1, 3] {
        let mut positions = std::collections::HashSet::new();
        for rank in 0..world {
            let plan = Plan::train_repeated(&perm, 3, 4, 7, 2, 0, Shard { rank, world });
            let r = plan.repeated.as_ref().unwrap();
            for i in 0..plan.order.len() {
                // The position in the repeated list: one per sample over all ranks.
                let p = plan.epoch_position(i);
                assert!(positions.insert(p), "position {p} twice");
                assert_eq!(plan.order[i], perm[p / 3]);
                assert_eq!(r.copy[i], p % 3);
                // Alternating flip counts views: epoch 2's copies are views 6, 7, 8.
                assert_eq!(plan.flip_epoch(i), 2 * 3 + p % 3);
            }
        }
    }
    // A plain epoch keeps the epoch as the flip's count.
    let plain = Plan::train(&perm, 4, 7, 2, 0, Shard::SINGLE);
    assert!(plain.repeated.is_none());
    assert!((0..plain.order.len()).all(|i| plain.flip_epoch(i) == 2));
}

/// Image i: a 12x12 pattern of its own (no two alike); label i.
struct Distinct {
    n: usize,
    classes: Vec<String>,
}

impl Dataset for Distinct {
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
        let rgb = (0..12 * 12)
            .flat_map(|p| {
                let (x, y) = (p % 12, p / 12);
                [
                    (x * 20) as u8,
                    (y * 20) as u8,
                    ((index * 7 + x * y) % 256) as u8,
                ]
            })
            .collect();
        Ok(Image::from_rgb(12, 12, rgb))
    }
    fn describe(&self, index: usize) -> String {
        format!("distinct {index}")
    }
}

/// The epoch's batches: (labels, images) in order.
fn epoch(ds: &Arc<dyn Dataset>, cfg: &DataConfig, epoch: usize) -> (Vec<i64>, Vec<Tensor>) {
    let mut labels = Vec::new();
    let mut images = Vec::new();
    for b in Loader::train(ds.clone(), cfg, 6, 5, epoch) {
        let b = b.unwrap();
        labels.extend(Vec::<i64>::try_from(&b.labels).unwrap());
        for r in 0..b.len() as i64 {
            images.push(b.images.get(r));
        }
    }
    (labels, images)
}

#[test]
fn the_loader_repeats_each_image_in_a_row_with_different_augmentations() {
    let n = 300;
    let ds: Arc<dyn Dataset> = Arc::new(Distinct {
        n,
        classes: (0..n).map(|i| format!("c{i}")).collect(),
    });
    let cfg = DataConfig {
        pipeline: Pipeline::Cifar,
        train_size: 12,
        val_size: 12,
        cifar_pad: 2,
        repeats: 3,
        workers: 2,
        ..DataConfig::default()
    };
    let (labels, images) = epoch(&ds, &cfg, 1);
    // 256 kept samples, 42 batches of 6.
    assert_eq!(labels.len(), 256 / 6 * 6);
    let mut same = 0;
    for (k, copies) in labels.chunks(3).enumerate() {
        if copies.len() < 3 {
            continue;
        }
        assert!(copies.iter().all(|&l| l == copies[0]), "copies in a row");
        for j in 1..3 {
            same += images[3 * k + j].equal(&images[3 * k]) as usize;
        }
    }
    // Each copy draws its own crop (25 offsets) and flip: two copies alike about 1 time in 50.
    assert!(same < 10, "{same} of 168 copies alike");
    // Another epoch shuffles again; the same epoch again is the same.
    let (again, again_images) = epoch(&ds, &cfg, 1);
    assert_eq!(again, labels);
    assert!(again_images.iter().zip(&images).all(|(a, b)| a.equal(b)));
    assert_ne!(epoch(&ds, &cfg, 2).0, labels);
    // With the alternating flip and no translation, the copies of an image alternate mirrored
    // and unmirrored.
    let flips = DataConfig {
        cifar_pad: 0,
        alternate_flip: true,
        ..cfg.clone()
    };
    let (labels, images) = epoch(&ds, &flips, 1);
    for (k, copies) in labels.chunks(3).enumerate() {
        if copies.len() < 3 {
            continue;
        }
        let [a, b, c] = [0, 1, 2].map(|j| &images[3 * k + j]);
        assert!(
            a.flip([2]).equal(b) && b.flip([2]).equal(c) && a.equal(c),
            "copies {k}"
        );
    }
    // repeats = 1 is the plain epoch: every image once.
    let plain = DataConfig {
        repeats: 1,
        ..cfg.clone()
    };
    let (labels, _) = epoch(&ds, &plain, 1);
    assert_eq!(labels.len(), n / 6 * 6);
    let mut sorted = labels.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), labels.len());
}

#[test]
fn repeats_is_validated_by_name() {
    for (text, key) in [
        ("[data]\nrepeats = 0\n", "data.repeats"),
        ("[data]\nrepeats = -1\n", "data.repeats"),
        (
            "[data]\nrepeats = 3\npipeline = \"cifar\"\non_device = true\n",
            "data.repeats",
        ),
    ] {
        let err = format!("{:#}", Config::from_toml_str(text, &[]).unwrap_err());
        assert!(err.contains(key), "{text}: {err}");
    }
    assert_eq!(
        Config::from_toml_str("[data]\nrepeats = 3\n", &[])
            .unwrap()
            .data
            .repeats,
        3
    );
    for task in ["segmentation", "detection"] {
        let text = format!("task = \"{task}\"\n[segment]\nnum_classes = 3\n[data]\nrepeats = 3\n");
        let err = format!(
            "{:#}",
            tricks::recipe::from_toml_str(&text, &[]).unwrap_err()
        );
        assert!(err.contains("data.repeats"), "{task}: {err}");
    }
}

#[test]
fn a_run_with_repeated_augmentation_takes_rasamplers_steps_and_a_small_set_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // 300 training images: 37 steps of 8 a plain epoch, 256 / 8 = 32 with repeats.
    common::image_folder(&data, 3, 100, 2, 16);
    let cfg = common::tiny_config(tmp.path(), &data, 1, "");
    let steps = |out: &std::path::Path| {
        tricks::checkpoint::load(&tricks::checkpoint::epoch_checkpoint_path(
            &out.join("checkpoints"),
            1,
        ))
        .unwrap()
        .state
        .unwrap()
        .global_step
    };
    let out = tmp.path().join("repeated");
    common::train(&cfg, &out, &["--set", "data.repeats=3"]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(v["train_loss"].as_f64().unwrap().is_finite(), "{metrics}");
    assert_eq!(steps(&out), 32);
    let plain = tmp.path().join("plain");
    common::train(&cfg, &plain, &[]);
    assert_eq!(steps(&plain), 37);
    // Fewer than 256 images keep nothing: refused, naming the key, before anything is written.
    let small = tmp.path().join("small");
    common::image_folder(&small, 2, 20, 2, 16);
    let small_cfg = common::tiny_config(tmp.path(), &small, 1, "");
    let refused = tmp.path().join("refused");
    let o = common::run(&[
        "train",
        "--config",
        small_cfg.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
        "--set",
        "data.repeats=3",
    ]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("data.repeats") && err.contains("256"), "{err}");
    assert!(!refused.join("config.toml").exists());
}
