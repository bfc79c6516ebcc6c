//! Semantic segmentation (paper §6): metrics, joint transforms, the dilated backbone, backbone
//! initialisation from a classification checkpoint, the data layout's errors, and a tiny
//! end-to-end `tricks train` / `eval` / `predict` on generated data.

mod common;

use common::{run, stderr, stdout};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tricks::config::{Config, ModelConfig};
use tricks::data::Image;
use tricks::model::{ModelSpec, ResNet};
use tricks::segment::transforms::{resize_mask_nearest, JointTransform};
use tricks::segment::{self, ConfusionMatrix, Mask, SegDataset, SegLoader, SegModel};

/// libtorch's random generator is process-wide and the tests of this file run in parallel
/// threads: the tests that seed it, initialise models or train hold this lock.
fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Colours of the synthetic classes: corners of the RGB cube, never black (black is padding).
const COLOURS: [[u8; 3]; 7] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [255, 0, 255],
    [0, 255, 255],
    [255, 255, 255],
];

/// A blocky image whose class at each pixel is the index of its colour in `COLOURS`.
fn blocky(w: u32, h: u32, block: u32, classes: usize, seed: u32) -> (Image, Mask) {
    let mut img = Image::new(w, h);
    let mut mask = Mask::new(w, h, 0);
    for y in 0..h {
        for x in 0..w {
            let c = ((x / block) * 7 + (y / block) * 3 + seed) as usize % classes;
            let i = (y * w + x) as usize;
            img.rgb[3 * i..3 * i + 3].copy_from_slice(&COLOURS[c]);
            mask.data[i] = c as u8;
        }
    }
    (img, mask)
}

/// A segmentation config: CIFAR ResNet-8, 3 classes, 16-px crops; `extra` (TOML) is merged over it.
fn seg_config(extra: &str) -> Config {
    let mut base: toml::Table =
        toml::from_str("task = \"segmentation\"\n[model]\nname = \"cifar_resnet8\"\n[segment]\nnum_classes = 3\ncrop_size = 16\n").unwrap();
    tricks::config::merge(&mut base, toml::from_str(extra).unwrap());
    Config::from_table(base, &[]).unwrap()
}

#[test]
fn miou_and_pixel_accuracy_match_a_hand_count_with_void_ignored() {
    // 3 classes, void = 255. Ground truth / prediction, 10 pixels (2 void).
    let gt = [0i64, 0, 0, 1, 1, 2, 2, 255, 255, 1];
    let pred = [0i64, 0, 1, 1, 2, 2, 2, 0, 1, 1];
    let mut cm = ConfusionMatrix::new(3);
    cm.add_pairs(&gt, &pred);
    // Labelled: 8 pixels; correct: 0,0 | 1 | 2,2 | 1 → 6.
    assert_eq!(cm.total(), 8);
    assert!((cm.pixel_accuracy() - 75.0).abs() < 1e-9);
    // IoU: class 0: TP 2, FP 0, FN 1 → 2/3. class 1: TP 2, FP 1, FN 1 → 2/4.
    // class 2: TP 2, FP 1, FN 0 → 2/3. Void pixels predicted 0 and 1 count nowhere.
    let iou = cm.iou();
    let expected = [200.0 / 3.0, 50.0, 200.0 / 3.0];
    for (got, want) in iou.iter().zip(expected) {
        assert!((got.unwrap() - want).abs() < 1e-9, "{iou:?}");
    }
    assert!((cm.mean_iou() - (200.0 / 3.0 + 50.0 + 200.0 / 3.0) / 3.0).abs() < 1e-9);

    // A class absent from ground truth and prediction is left out of the mean; a class that is
    // only predicted counts (IoU 0).
    let mut cm = ConfusionMatrix::new(4);
    cm.add_pairs(&[0, 0, 1, 255], &[0, 0, 3, 2]);
    assert_eq!(cm.iou(), vec![Some(100.0), Some(0.0), None, Some(0.0)]);
    assert!((cm.mean_iou() - 100.0 / 3.0).abs() < 1e-9);

    // The tensor path counts exactly as the slice path, accumulated over batches.
    let mut a = ConfusionMatrix::new(3);
    a.add_counts(&segment::metrics::batch_counts(
        &Tensor::from_slice(&gt[..5]).view([1, 5]),
        &Tensor::from_slice(&pred[..5]).view([1, 5]),
        3,
    ));
    a.add_counts(&segment::metrics::batch_counts(
        &Tensor::from_slice(&gt[5..]).view([1, 1, 5]),
        &Tensor::from_slice(&pred[5..]).view([1, 1, 5]),
        3,
    ));
    let mut b = ConfusionMatrix::new(3);
    b.add_pairs(&gt, &pred);
    assert_eq!(a, b);
}

#[test]
fn mask_resizing_is_nearest_and_never_invents_classes() {
    let ids = [1u8, 5, 9];
    let mut m = Mask::new(23, 17, 0);
    for (i, v) in m.data.iter_mut().enumerate() {
        *v = ids[(i * 7 / 5) % 3];
    }
    for (w, h) in [(7, 5), (100, 3), (13, 29), (1, 1), (46, 34), (11, 8)] {
        let r = resize_mask_nearest(&m, w, h);
        assert_eq!((r.width, r.height, r.data.len()), (w, h, (w * h) as usize));
        let values: BTreeSet<u8> = r.data.iter().copied().collect();
        assert!(
            values.iter().all(|v| ids.contains(v)),
            "{w}x{h}: {values:?}"
        );
    }
    // Pixel-centre convention: halving picks source pixel 2i + 1, doubling repeats each pixel.
    let row = Mask::from_vec(6, 1, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(resize_mask_nearest(&row, 3, 1).data, vec![1, 3, 5]);
    assert_eq!(
        resize_mask_nearest(&row, 12, 1).data,
        vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    );
}

#[test]
fn joint_transforms_keep_image_and_mask_aligned() {
    let cfg = seg_config("[segment]\ncrop_size = 24\nscale = [0.5, 2.0]\nignore_index = 255");
    let t = JointTransform::new(&cfg);
    assert!(t.flip);
    let (img, mask) = blocky(40, 30, 5, COLOURS.len(), 0);
    let (mut checked, mut labelled, mut padded) = (0usize, 0usize, 0usize);
    let mut flipped_or_scaled = BTreeSet::new();
    for seed in 0..60u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (im, mk) = t.train_pair(&img, &mask, &mut rng);
        assert_eq!((im.width, im.height, mk.width, mk.height), (24, 24, 24, 24));
        for y in 0..24 {
            for x in 0..24 {
                let p = im.pixel(x, y);
                let m = mk.get(x, y);
                // Padding: image 0 and mask ignore, and only there.
                assert_eq!(
                    m == 255,
                    p == [0, 0, 0],
                    "seed {seed} ({x},{y}): {p:?} mask {m}"
                );
                if m == 255 {
                    padded += 1;
                    continue;
                }
                labelled += 1;
                // Inside a block the colour is exact; where bilinear blends two blocks it matches
                // no class colour and is skipped.
                let close = |c: &[u8; 3]| {
                    c.iter()
                        .zip(&p)
                        .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 3)
                };
                if let Some(class) = COLOURS.iter().position(close) {
                    assert_eq!(
                        m as usize, class,
                        "seed {seed} ({x},{y}): colour {p:?} is class {class}, mask says {m}"
                    );
                    checked += 1;
                }
            }
        }
        flipped_or_scaled.insert(mk.data.clone());
    }
    assert!(
        checked * 10 >= labelled * 7,
        "only {checked} of {labelled} labelled pixels had a pure colour"
    );
    assert!(padded > 0, "scales below 24/30 must pad");
    assert!(
        flipped_or_scaled.len() > 50,
        "the random transforms should differ between seeds"
    );
}

#[test]
fn loaders_are_deterministic_and_eval_is_the_untouched_image() {
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path(), 6, 3, 20, 16);
    let cfg = seg_config(&format!(
        "[data]\ndir = {:?}\nworkers = 1\n",
        tmp.path().display().to_string()
    ));
    let (train, val) = segment::dataset::open_train_val(&cfg).unwrap();
    assert_eq!((train.len(), val.len()), (6, 3));
    let batches = |workers: usize| -> Vec<(Tensor, Tensor)> {
        let mut c = cfg.clone();
        c.data.workers = workers;
        SegLoader::train(train.clone(), &c, 2, 7, 1)
            .map(|b| b.unwrap())
            .map(|b| (b.images, b.masks))
            .collect()
    };
    let (a, b) = (batches(1), batches(2));
    assert_eq!(a.len(), 3);
    for ((xa, ya), (xb, yb)) in a.iter().zip(&b) {
        assert_eq!(xa.size(), vec![2, 3, 16, 16]);
        assert_eq!(ya.size(), vec![2, 16, 16]);
        assert_eq!(ya.kind(), Kind::Int64);
        assert!(xa.equal(xb) && ya.equal(yb));
    }
    // Starting mid-epoch gives the rest of the same pass.
    let rest: Vec<_> = SegLoader::train_from(train.clone(), &cfg, 2, 7, 1, 1)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(rest.len(), 2);
    for (r, (x, y)) in rest.iter().zip(&a[1..]) {
        assert!(r.images.equal(x) && r.masks.equal(y));
    }
    // Evaluation: full images in file order, masks as stored.
    let batch = SegLoader::eval(val.clone(), &cfg, 8)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(batch.images.size(), vec![3, 3, 16, 20]);
    for i in 0..3 {
        let (img, mask) = val.sample(i).unwrap();
        let want: Vec<i64> = mask.data.iter().map(|&v| v as i64).collect();
        let got: Vec<i64> = Vec::try_from(batch.masks.get(i as i64).flatten(0, -1)).unwrap();
        assert_eq!(got, want);
        let r = f64::try_from(batch.images.get(i as i64).get(0).get(0).get(0)).unwrap();
        let expect = (img.rgb[0] as f64 / 255.0 - cfg.data.mean[0]) / cfg.data.std[0];
        assert!((r - expect).abs() < 1e-5);
    }
}

fn spec(name: &str, variant: &str) -> ModelSpec {
    ModelSpec::from_config(&ModelConfig {
        name: name.into(),
        variant: variant.into(),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn dilated_backbone_gives_a_feature_map_of_h_over_8_with_classification_names() {
    let _rng = torch_rng();
    tch::manual_seed(0);
    for (name, variant, channels) in [
        ("resnet18", "a", 512),
        ("resnet18", "d", 512),
        ("resnet50", "d", 2048),
    ] {
        let s = spec(name, variant);
        let x = Tensor::randn([1, 3, 64, 48], (Kind::Float, Device::Cpu));
        for (os, hw) in [(8, [8, 6]), (16, [4, 3])] {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = ResNet::backbone(&vs.root(), &s, os);
            let f = tch::no_grad(|| net.features(&x, false));
            assert_eq!(
                f.size(),
                vec![1, channels, hw[0], hw[1]],
                "{name}-{variant} output stride {os}"
            );
        }
        // Same names and shapes as the classification network, minus `fc`.
        let cls = nn::VarStore::new(Device::Cpu);
        let _ = ResNet::new(&cls.root(), &s, 10);
        let bb = nn::VarStore::new(Device::Cpu);
        let _ = ResNet::backbone(&bb.root(), &s, 8);
        let mut want: Vec<(String, Vec<i64>)> = cls
            .variables()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fc."))
            .map(|(k, v)| (k, v.size()))
            .collect();
        let mut got: Vec<(String, Vec<i64>)> = bb
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{name}-{variant}");
        // Output stride 32 is the classification network.
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet::with_output_stride(&vs.root(), &s, 10, 32);
        assert_eq!(net.features(&x, false).size(), vec![1, channels, 2, 2]);
        assert_eq!(net.forward_t(&x, false).size(), vec![1, 10]);
    }
    // The CIFAR layout is at stride 4 already: output stride 8 leaves it as it is.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::backbone(&vs.root(), &spec("cifar_resnet8", "a"), 8);
    assert_eq!(
        net.features(
            &Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)),
            false
        )
        .size(),
        vec![1, 64, 8, 8]
    );

    // The FCN: logits at the input size, head under `head.`.
    let cfg = seg_config("[model]\nname = \"resnet18\"\nvariant = \"d\"\n");
    let vs = nn::VarStore::new(Device::Cpu);
    let m = SegModel::new(&vs.root(), &cfg).unwrap();
    let y = tch::no_grad(|| {
        m.forward_t(
            &Tensor::randn([2, 3, 40, 56], (Kind::Float, Device::Cpu)),
            false,
        )
    });
    assert_eq!(y.size(), vec![2, 3, 40, 56]);
    let vars = vs.variables();
    assert_eq!(vars["head.0.weight"].size(), vec![128, 512, 3, 3]);
    assert_eq!(vars["head.4.weight"].size(), vec![3, 128, 1, 1]);
    assert!(vars.contains_key("head.1.running_mean") && vars.contains_key("head.4.bias"));
    assert!(!vars.contains_key("head.0.bias") && !vars.keys().any(|k| k.starts_with("fc.")));
}

/// Saves a trained-looking classification checkpoint of `cfg.model` (random weights, BN stats set).
fn classification_checkpoint(
    path: &Path,
    model: &ModelConfig,
    classes: i64,
) -> Vec<(String, Tensor)> {
    tch::manual_seed(42);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = ResNet::new(&vs.root(), &ModelSpec::from_config(model).unwrap(), classes);
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach() + Tensor::randn_like(&v) * 0.1))
        .collect();
    let cfg = Config {
        model: model.clone(),
        ..Config::default()
    };
    tricks::checkpoint::save(path, &tensors, Some(&cfg), &[], None).unwrap();
    tensors
}

#[test]
fn a_classification_checkpoint_initialises_the_backbone_and_only_the_head_stays_at_init() {
    let _rng = torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("cls.safetensors");
    let model = ModelConfig {
        name: "cifar_resnet8".into(),
        variant: "d".into(),
        ..Default::default()
    };
    let saved = classification_checkpoint(&ckpt, &model, 10);
    let cfg = seg_config(&format!(
        "[segment]\nbackbone = {:?}\n[model]\nname = \"cifar_resnet8\"\nvariant = \"d\"\n",
        ckpt.display().to_string()
    ));
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = SegModel::new(&vs.root(), &cfg).unwrap();
    let before: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    segment::load_backbone(&vs, &cfg).unwrap();
    let vars = vs.variables();
    let mut backbone = 0;
    for (name, t) in &saved {
        if name.starts_with("fc.") {
            assert!(!vars.contains_key(name));
            continue;
        }
        assert!(vars[name].equal(t), "{name} was not loaded");
        backbone += 1;
    }
    assert!(backbone > 20);
    for (name, t) in &before {
        if name.starts_with("head.") {
            assert!(vars[name].equal(t), "{name} changed");
        }
    }

    // A tensor of another shape is named with both shapes.
    let bad = tmp.path().join("bad.safetensors");
    let mut tensors: Vec<(String, Tensor)> = saved
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    for (k, v) in tensors.iter_mut() {
        if k == "layer2.0.conv1.weight" {
            *v = Tensor::zeros([8, 16, 3, 3], (Kind::Float, Device::Cpu));
        }
    }
    let c = Config {
        model: model.clone(),
        ..Config::default()
    };
    tricks::checkpoint::save(&bad, &tensors, Some(&c), &[], None).unwrap();
    let mut cfg_bad = cfg.clone();
    cfg_bad.segment.backbone = bad.display().to_string();
    let e = format!("{:#}", segment::load_backbone(&vs, &cfg_bad).unwrap_err());
    assert!(
        e.contains("layer2.0.conv1.weight")
            && e.contains("[8, 16, 3, 3]")
            && e.contains("[32, 16, 3, 3]"),
        "{e}"
    );
    assert!(e.contains("segment.backbone"), "{e}");

    // A checkpoint of another architecture is refused by name.
    let mut other = cfg.clone();
    other.model.variant = "a".into();
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = SegModel::new(&vs.root(), &other).unwrap();
    let e = format!("{:#}", segment::load_backbone(&vs, &other).unwrap_err());
    assert!(e.contains("variant d") && e.contains("variant a"), "{e}");
}

#[test]
fn backbone_lr_mult_scales_the_sgd_step_of_selected_parameters() {
    let vs = nn::VarStore::new(Device::Cpu);
    let a = (vs.root() / "layer1").var_copy("w", &Tensor::from_slice(&[1.0f32]));
    let b = (vs.root() / "head").var_copy("w", &Tensor::from_slice(&[1.0f32]));
    let cfg = tricks::config::OptimConfig {
        momentum: 0.0,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = tricks::train::optim::Optimizer::new(&vs, &cfg);
    assert!(opt.params.iter().all(|p| p.lr_scale == 1.0));
    assert_eq!(opt.set_lr_scale(|n| !n.starts_with("head."), 0.1), 1);
    (&a * 2.0 + &b * 2.0).sum(Kind::Float).backward();
    opt.step(0.5);
    assert!((f64::try_from(&a).unwrap() - (1.0 - 0.5 * 0.1 * 2.0)).abs() < 1e-6);
    assert!((f64::try_from(&b).unwrap() - (1.0 - 0.5 * 2.0)).abs() < 1e-6);
}

/// Writes `root/{train,val}/{images,masks}`: blocky images whose colours are classes 0..2, and
/// colour 3 is void (255) in the mask. PNG and JPEG images (JPEG blurs colours; masks are exact).
fn write_dataset(root: &Path, train: usize, val: usize, w: u32, h: u32) {
    for (split, n) in [("train", train), ("val", val)] {
        std::fs::create_dir_all(root.join(split).join("images")).unwrap();
        std::fs::create_dir_all(root.join(split).join("masks")).unwrap();
        for i in 0..n {
            let (img, mut mask) = blocky(w, h, 4, 4, i as u32);
            mask.data
                .iter_mut()
                .filter(|v| **v == 3)
                .for_each(|v| *v = 255);
            let stem = format!("{split}_{i:03}");
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            image::RgbImage::from_raw(w, h, img.rgb)
                .unwrap()
                .save(
                    root.join(split)
                        .join("images")
                        .join(format!("{stem}.{ext}")),
                )
                .unwrap();
            image::GrayImage::from_raw(w, h, mask.data)
                .unwrap()
                .save(root.join(split).join("masks").join(format!("{stem}.png")))
                .unwrap();
        }
    }
}

#[test]
fn layout_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path(), 3, 1, 12, 8);
    let dir = tmp.path().join("train");
    // Missing mask.
    std::fs::remove_file(dir.join("masks").join("train_001.png")).unwrap();
    let e = format!("{:#}", SegDataset::open(&dir).err().unwrap());
    assert!(
        e.contains("missing mask") && e.contains("train_001.jpg") && e.contains("train_001.png"),
        "{e}"
    );
    // An RGB mask is not class ids.
    image::RgbImage::new(12, 8)
        .save(dir.join("masks").join("train_001.png"))
        .unwrap();
    let ds = SegDataset::open(&dir).unwrap();
    let e = format!("{:#}", ds.sample(1).unwrap_err());
    assert!(e.contains("train_001.png") && e.contains("8-bit"), "{e}");
    // 16-bit grey is not 8-bit either.
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::new(12, 8)
        .save(dir.join("masks").join("train_001.png"))
        .unwrap();
    let e = format!("{:#}", ds.sample(1).unwrap_err());
    assert!(e.contains("train_001.png") && e.contains("8-bit"), "{e}");
    // Size mismatch names both files and sizes.
    image::GrayImage::new(10, 8)
        .save(dir.join("masks").join("train_001.png"))
        .unwrap();
    let e = format!("{:#}", ds.sample(1).unwrap_err());
    assert!(
        e.contains("train_001.png")
            && e.contains("10x8")
            && e.contains("12x8")
            && e.contains("train_001.jpg"),
        "{e}"
    );
    // A value that is neither a class nor void: the loader names the mask.
    image::GrayImage::from_pixel(12, 8, image::Luma([7]))
        .save(dir.join("masks").join("train_001.png"))
        .unwrap();
    let cfg = seg_config(&format!(
        "[segment]\ncrop_size = 8\n[data]\ndir = {:?}\nworkers = 1\n",
        tmp.path().display().to_string()
    ));
    let (train, _) = segment::dataset::open_train_val(&cfg).unwrap();
    let e = SegLoader::eval(train, &cfg, 4)
        .find_map(|b| b.err())
        .map(|e| format!("{e:#}"))
        .unwrap();
    assert!(e.contains("train_001.png") && e.contains("value 7"), "{e}");
}

#[test]
fn segmentation_config_keys_are_validated_by_name() {
    for (text, key) in [
        ("task = \"segmentation\"\n", "segment.num_classes"),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 12\nignore_index = 11\n",
            "segment.ignore_index",
        ),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 2\nscale = [2.0, 0.5]\n",
            "segment.scale",
        ),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 2\noutput_stride = 4\n",
            "segment.output_stride",
        ),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 2\nclass_names = [\"a\"]\n",
            "segment.class_names",
        ),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 2\n[mixup]\nalpha = 0.2\n",
            "mixup.alpha",
        ),
        (
            "task = \"segmentation\"\n[segment]\nnum_classes = 2\ncrop = 3\n",
            "crop",
        ),
        ("task = \"tracking\"\n", "task"),
    ] {
        let e = format!(
            "{:#}",
            tricks::recipe::from_toml_str(text, &[]).unwrap_err()
        );
        assert!(e.contains(key), "{text} → {e}");
    }
    // A classification config neither needs nor writes a [segment] section or a task.
    let c = Config::from_toml_str("", &[]).unwrap();
    assert!(!c.to_toml().contains("segment") && !c.to_toml().contains("task"));
    let s = seg_config("");
    assert_eq!(Config::from_toml_str(&s.to_toml(), &[]).unwrap(), s);
}

#[test]
fn shipped_camvid_configs_and_the_transfer_study_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for e in std::fs::read_dir(root.join("configs/camvid")).unwrap() {
        let p = e.unwrap().path();
        let c = tricks::recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        assert_eq!(c.task, tricks::config::Task::Segmentation);
        assert_eq!((c.segment.num_classes, c.segment.ignore_index), (11, 11));
        n += 1;
    }
    assert!(n >= 1);
    let study =
        tricks::experiments::Study::load(&root.join("studies/transfer_segmentation.toml")).unwrap();
    assert!(study.variants.len() >= 4);
    for v in &study.variants {
        assert_eq!(
            v.config.task,
            tricks::config::Task::Segmentation,
            "{}",
            v.name
        );
    }
    let backbones: BTreeSet<&str> = study
        .variants
        .iter()
        .map(|v| v.config.segment.backbone.as_str())
        .collect();
    assert_eq!(
        backbones.len(),
        study.variants.len(),
        "each variant has its own backbone"
    );
}

#[test]
fn tiny_training_writes_metrics_and_eval_and_predict_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 4, 2, 20, 16);
    let cfg = tmp.path().join("seg.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 1\ntask = \"segmentation\"\n[model]\nname = \"cifar_resnet8\"\n[data]\ndir = {:?}\nworkers = 1\n\
             [train]\nepochs = 2\nbatch_size = 2\nthreads = 1\n[optim]\nlr = 0.05\nschedule = \"cosine\"\nno_bias_decay = true\n\
             [segment]\nnum_classes = 3\ncrop_size = 16\nscale = [0.75, 1.25]\nbackbone_lr_mult = 0.5\n\
             class_names = [\"red\", \"green\", \"blue\"]\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o = run(&["train", "--config", cfg.to_str().unwrap(), "--check"]);
    assert!(
        o.status.success() && stdout(&o).contains("4 training and 2 evaluation"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("done: 2 epochs") && stdout(&o).contains("mIoU"),
        "{}",
        stdout(&o)
    );

    // metrics.jsonl: one line per epoch, the segmentation metrics under their own names.
    let raw = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines.len(), 2);
    for key in [
        "epoch",
        "lr",
        "train_loss",
        "val_loss",
        "train_pixel_acc",
        "val_pixel_acc",
        "val_miou",
        "seconds",
        "images_per_second",
    ] {
        assert!(
            lines[0].contains(&format!("\"{key}\"")),
            "{key}: {}",
            lines[0]
        );
    }
    let m = segment::read_metrics(&out.join("metrics.jsonl")).unwrap();
    for e in &m {
        let (miou, acc) = (e.val_miou.unwrap(), e.val_pixel_acc.unwrap());
        assert!(
            (0.0..=100.0).contains(&miou)
                && (0.0..=100.0).contains(&acc)
                && e.train_loss.is_finite()
        );
    }
    // No classification names stand in for them any more, in the lines or the summary.
    for key in [
        "val_top1",
        "val_top5",
        "train_top1",
        "\"miou\"",
        "\"pixel_acc\"",
    ] {
        assert!(!raw.contains(key), "{key} in {raw}");
    }
    let summary_text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    assert!(!summary_text.contains("top1"), "{summary_text}");
    let summary: segment::SegSummary = serde_json::from_str(&summary_text).unwrap();
    assert_eq!(
        (summary.epochs, summary.final_miou, summary.final_pixel_acc),
        (2, m[1].val_miou.unwrap(), m[1].val_pixel_acc.unwrap())
    );
    // Studies read it through the segmentation adaptor: headline = mIoU, second = pixel accuracy.
    let outcome = tricks::experiments::results::read_summary(
        tricks::config::Task::Segmentation,
        &out.join("summary.json"),
    )
    .unwrap();
    assert_eq!(
        (
            outcome.final_metric,
            outcome.final_second,
            outcome.best_metric
        ),
        (
            summary.final_miou,
            summary.final_pixel_acc,
            summary.best_miou
        )
    );
    let ck = tricks::checkpoint::load(&out.join("checkpoints/epoch-0002.safetensors")).unwrap();
    assert_eq!(ck.state.as_ref().unwrap().global_step, 4);
    assert!(
        ck.tensors.contains_key("head.4.weight")
            && ck.tensors.contains_key("optim.momentum.head.4.weight")
    );
    assert!(
        ck.tensors.contains_key("layer3.0.conv1.weight")
            && !ck.tensors.keys().any(|k| k.starts_with("fc."))
    );
    assert_eq!(ck.classes, vec!["red", "green", "blue"]);

    // eval on the last checkpoint reproduces the final validation metrics.
    let last = out.join("checkpoints/epoch-0002.safetensors");
    let o = run(&[
        "eval",
        "--checkpoint",
        last.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("pixel accuracy {:.2}%", summary.final_pixel_acc)),
        "{text} vs {summary:?}"
    );
    assert!(
        text.contains(&format!("mIoU {:.2}%", summary.final_miou)) && text.contains("red"),
        "{text}"
    );

    // predict writes a mask of the image's size in palette colours.
    let img = data.join("val/images/val_000.png");
    let png = tmp.path().join("pred.png");
    let o = run(&[
        "predict",
        "--checkpoint",
        out.join("best.safetensors").to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = image::open(&png).unwrap().to_rgb8();
    assert_eq!(p.dimensions(), (20, 16));
    let pal = segment::palette(3);
    assert!(p.pixels().all(|px| pal.contains(&px.0)));

    // A classification checkpoint cannot be used to predict masks.
    let cls = tmp.path().join("cls.safetensors");
    {
        let _rng = torch_rng();
        classification_checkpoint(&cls, &ModelConfig::default(), 3);
    }
    let o = run(&[
        "predict",
        "--checkpoint",
        cls.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("classification checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_interrupted_and_resumed_run_ends_exactly_as_an_uninterrupted_one() {
    let _rng = torch_rng();
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 4, 2, 16, 16);
    let cfg = seg_config(&format!(
        "seed = 5\n[data]\ndir = {:?}\nworkers = 2\n[train]\nepochs = 2\nbatch_size = 2\nthreads = 1\n\
         [optim]\nlr = 0.05\nschedule = \"cosine\"\n[segment]\nscale = [0.75, 1.5]\n",
        data.display().to_string()
    ));
    let quiet = |o: &mut tricks::engine::RunOptions| o.log = Arc::new(|_: &str| {});
    let mut a = tricks::engine::RunOptions::new(tmp.path().join("a"), Device::Cpu);
    quiet(&mut a);
    let sa = segment::train(&cfg, &a).unwrap();

    // Stop during epoch 2 (the flag is raised when epoch 1 is logged), then resume.
    let out_b = tmp.path().join("b");
    let mut b = tricks::engine::RunOptions::new(&out_b, Device::Cpu);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    b.stop = stop;
    b.log = Arc::new(move |m: &str| {
        if m.starts_with("epoch 1/2") {
            flag.store(true, Ordering::SeqCst);
        }
    });
    assert!(segment::train(&cfg, &b).unwrap().stopped_early);
    assert!(!out_b.join("summary.json").exists());
    let interrupt = out_b
        .join("checkpoints")
        .join(tricks::checkpoint::INTERRUPT_FILE);
    let state = tricks::checkpoint::load(&interrupt).unwrap().state.unwrap();
    assert_eq!(
        (state.epochs_done, state.batch_in_epoch, state.global_step),
        (1, 1, 3)
    );
    let mut b = tricks::engine::RunOptions::new(&out_b, Device::Cpu);
    quiet(&mut b);
    b.resume = true;
    let sb = segment::train(&cfg, &b).unwrap();
    assert!(!interrupt.exists());
    assert_eq!(
        (sb.final_miou, sb.final_pixel_acc, sb.final_val_loss),
        (sa.final_miou, sa.final_pixel_acc, sa.final_val_loss)
    );
    let wa =
        tricks::checkpoint::load(&tmp.path().join("a/checkpoints/epoch-0002.safetensors")).unwrap();
    let wb = tricks::checkpoint::load(&out_b.join("checkpoints/epoch-0002.safetensors")).unwrap();
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for (k, t) in &wa.tensors {
        assert!(t.equal(&wb.tensors[k]), "{k} differs after resume");
    }
    let ma = segment::read_metrics(&tmp.path().join("a/metrics.jsonl")).unwrap();
    let mb = segment::read_metrics(&out_b.join("metrics.jsonl")).unwrap();
    assert_eq!(
        ma.iter()
            .map(|m| (m.epoch, m.train_loss, m.val_miou))
            .collect::<Vec<_>>(),
        mb.iter()
            .map(|m| (m.epoch, m.train_loss, m.val_miou))
            .collect::<Vec<_>>()
    );
}

/// kill -9 after the first epoch's checkpoint, then `--resume`: the run ends bit-identical to a
/// straight one (the engine's resume, as for classification in tests/train_cli.rs).
#[test]
fn resume_after_kill_9_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::segmentation_folder(&data, 64, 4, 16, 16);
    let cfg = tmp.path().join("seg.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 4\ntask = \"segmentation\"\n[model]\nname = \"cifar_resnet8\"\n[data]\ndir = {:?}\nworkers = 2\n\
             [train]\nepochs = 3\nbatch_size = 2\nthreads = 1\n[optim]\nlr = 0.02\nschedule = \"cosine\"\n\
             [segment]\nnum_classes = 3\ncrop_size = 16\nscale = [0.75, 1.25]\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let straight = tmp.path().join("straight");
    let o = run(&["train", "--config", c, "--out", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let killed = tmp.path().join("killed");
    common::kill_after_first_epoch(c, &killed, std::time::Duration::from_millis(100));
    common::resume(c, &killed);
    common::assert_same_weights(&straight, &killed, 3);
    let ma = segment::read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let mb = segment::read_metrics(&killed.join("metrics.jsonl")).unwrap();
    assert_eq!(ma.len(), 3);
    assert_eq!(
        ma.iter().map(|m| m.task.clone()).collect::<Vec<_>>(),
        mb.iter().map(|m| m.task.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        ma.iter()
            .map(|m| (m.train_loss, m.val_loss))
            .collect::<Vec<_>>(),
        mb.iter()
            .map(|m| (m.train_loss, m.val_loss))
            .collect::<Vec<_>>()
    );
}
