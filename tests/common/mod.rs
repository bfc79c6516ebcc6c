//! Shared helpers for integration tests: tiny generated datasets and configs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Writes an ImageFolder dataset: `classes` classes whose images differ in colour and stripe
/// direction (learnable in a few steps), `per_class` training and `val_per_class` evaluation images.
pub fn image_folder(
    root: &Path,
    classes: usize,
    per_class: usize,
    val_per_class: usize,
    size: u32,
) {
    for (split, n) in [("train", per_class), ("val", val_per_class)] {
        for c in 0..classes {
            let dir = root.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = class_image(c, i, size);
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(dir.join(format!("{i:04}.{ext}"))).unwrap();
            }
        }
    }
}

/// Image `i` of class `c` of [`image_folder`]: the class sets the colour and the stripes'
/// direction, the index their phase and the blue of the stripes.
pub fn class_image(c: usize, i: usize, size: u32) -> image::RgbImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        let stripe = if c.is_multiple_of(2) { x } else { y };
        let on = (stripe / 2 + i as u32).is_multiple_of(2);
        let base = [
            (c * 80 % 256) as u8,
            (255 - c * 60 % 256) as u8,
            (i * 7 % 256) as u8,
        ];
        if on {
            image::Rgb(base)
        } else {
            image::Rgb([base[0] / 3, base[1] / 3, 200])
        }
    })
}

/// Writes a segmentation dataset (`split/images/*.png`, `split/masks/*.png`) of `w`×`h` images
/// whose 4-px blocks belong to one of 3 classes or to void (255), the class a function of the
/// block's position and the image's index, the colour a function of the class.
pub fn segmentation_folder(root: &Path, train: usize, val: usize, w: u32, h: u32) {
    for (split, n) in [("train", train), ("val", val)] {
        std::fs::create_dir_all(root.join(split).join("images")).unwrap();
        std::fs::create_dir_all(root.join(split).join("masks")).unwrap();
        for i in 0..n as u32 {
            // Class of a 4-px block from its position and the image index; class 3 is void.
            let class = |x: u32, y: u32| ((x / 4 + 2 * (y / 4) + i) % 4) as u8;
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let c = class(x, y) as u32;
                image::Rgb([
                    (c * 70) as u8,
                    (200 - c * 50) as u8,
                    ((x * 9 + y) % 256) as u8,
                ])
            });
            let mask = image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([match class(x, y) {
                    3 => 255,
                    c => c,
                }])
            });
            let stem = format!("{split}_{i:03}");
            img.save(root.join(split).join("images").join(format!("{stem}.png")))
                .unwrap();
            mask.save(root.join(split).join("masks").join(format!("{stem}.png")))
                .unwrap();
        }
    }
}

/// A tiny config: CIFAR ResNet-8 on `size`-px images, CIFAR pipeline, deterministic threads.
pub fn tiny_config(dir: &Path, data: &Path, epochs: usize, extra: &str) -> PathBuf {
    let text = format!(
        r#"seed = 3
[model]
name = "cifar_resnet8"
[data]
dir = "{}"
pipeline = "cifar"
train_size = 16
val_size = 16
val_crop_ratio = 1.0
cifar_pad = 2
workers = 2
[train]
epochs = {epochs}
batch_size = 8
threads = 1
[optim]
lr = 0.05
step_epochs = [2]
{extra}"#,
        data.display()
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// airbench94's recipe (configs/cifar10/airbench94.toml's switches) on 32-px images in `data`, for
/// `epochs` with lookahead every `lookahead_every` steps and a batch of 8, written to
/// `dir/airbench.toml`.
pub fn airbench_config(dir: &Path, data: &Path, epochs: usize, lookahead_every: usize) -> PathBuf {
    let text = format!(
        r#"seed = 3
[model]
name = "airbench94"
whiten_bias_epochs = 1
[data]
dir = "{}"
pipeline = "cifar"
train_size = 32
val_size = 32
val_crop_ratio = 1.0
cifar_pad = 2
pad_mode = "reflect"
alternate_flip = true
workers = 2
[train]
epochs = {epochs}
batch_size = 8
threads = 1
keep_checkpoints = 4
eval_flip = true
eval_translate = true
[optim]
lr = 0.1
momentum = 0.85
weight_decay = 5e-3
bn_bias_lr_scale = 64.0
schedule = "triangle"
lookahead = true
lookahead_every = {lookahead_every}
[loss]
label_smoothing = 0.18
"#,
        data.display()
    );
    let path = dir.join("airbench.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `tricks train --config config --out out extra…`; panics with the run's stderr if it fails.
pub fn train(config: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

pub fn tricks() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tricks"))
}

pub fn run(args: &[&str]) -> Output {
    tricks().args(args).output().expect("run tricks")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// An environment variable parsed as `T`, or `default` when it is unset or does not parse
/// (benchmark knobs).
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Trains `config` into `out` and kills it (SIGKILL) `settle` after its epoch-1 checkpoint
/// appears; the run must not have finished by then.
pub fn kill_after_first_epoch(config: &str, out: &Path, settle: Duration) {
    let mut child = tricks()
        .args(["train", "--config", config, "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = tricks::checkpoint::epoch_checkpoint_path(&out.join("checkpoints"), 1);
    let start = Instant::now();
    while !first.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(settle);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.join("summary.json").exists(),
        "the run finished before the kill; test is void"
    );
}

/// Continues the run in `out` with `--resume`; it must resume from a checkpoint and finish.
pub fn resume(config: &str, out: &Path) {
    let o = run(&[
        "train",
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
}

/// The checkpoints of `epoch` in the run folders `a` and `b` hold the same tensors, bit for bit.
pub fn assert_same_weights(a: &Path, b: &Path, epoch: usize) {
    let load = |out: &Path| {
        tricks::checkpoint::load(&tricks::checkpoint::epoch_checkpoint_path(
            &out.join("checkpoints"),
            epoch,
        ))
        .unwrap()
        .tensors
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "tensor {k} differs after resume");
    }
}

/// The interpreter of the Python references (PyTorch, timm, SciPy, tensorboard): `TRICKS_PYTHON`,
/// else the project's `.venv/bin/python` that `scripts/setup.sh --with-timm` fills.
pub fn python() -> PathBuf {
    match std::env::var_os("TRICKS_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    }
}

/// Runs a reference `script` from the venv with `out` as its argument (it writes its results
/// there); `false` when the venv or a package is missing (the comparison `what` is then skipped,
/// or fails under `TRICKS_REQUIRE_PARITY=1`). Fails on any other error of the script.
pub fn reference(what: &str, script: &str, out: &std::path::Path) -> bool {
    let py = python();
    if !py.exists() {
        skip_reference(what, "no Python venv");
        return false;
    }
    let o = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("No module named") {
        skip_reference(what, &err);
        return false;
    }
    assert!(o.status.success(), "{what}: {err}");
    true
}

/// A comparison against a Python reference that cannot run: prints why and lets the test pass,
/// or fails with `TRICKS_REQUIRE_PARITY=1` (as `make test` sets it).
pub fn skip_reference(what: &str, why: &str) {
    if std::env::var("TRICKS_REQUIRE_PARITY").is_ok_and(|v| v == "1") {
        panic!("{what} cannot run and TRICKS_REQUIRE_PARITY=1: {why}");
    }
    eprintln!("SKIP {what}: {why} (scripts/setup.sh --with-timm installs the references)");
}

/// Writes a COCO-layout detection dataset (`annotations/instances_{train,val}.json`,
/// `images/{train,val}/*.png`): grey images of `w`×`h` (even indices) and `w + 16`×`h` (odd:
/// a batch pads them, as real data) with 1–3 filled rectangles each, class 1
/// ("red") red and class 2 ("blue") blue, whose boxes are the annotations. Returns the number of
/// objects per split.
pub fn detection_folder(root: &Path, train: usize, val: usize, w: u32, h: u32) -> [usize; 2] {
    let mut counts = [0; 2];
    for (s, (split, n)) in [("train", train), ("val", val)].into_iter().enumerate() {
        let dir = root.join("images").join(split);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut images, mut annotations) = (Vec::new(), Vec::new());
        for i in 0..n as u32 {
            let w = w + 16 * (i % 2);
            let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([110, 110, 110]));
            for k in 0..1 + i % 3 {
                // Deterministic boxes: position and size from the image and object index.
                let (bw, bh) = (
                    w / 4 + (i * 7 + k * 5) % (w / 4),
                    h / 4 + (i * 5 + k * 3) % (h / 4),
                );
                let x = (i * 13 + k * 29) % (w - bw);
                let y = (i * 11 + k * 17) % (h - bh);
                let class = 1 + (i + k) % 2;
                let colour = if class == 1 {
                    [220, 30, 30]
                } else {
                    [30, 30, 220]
                };
                for yy in y..y + bh {
                    for xx in x..x + bw {
                        img.put_pixel(xx, yy, image::Rgb(colour));
                    }
                }
                annotations.push(serde_json::json!({
                    "id": annotations.len() + 1, "image_id": i + 1, "category_id": class,
                    "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
                }));
            }
            let name = format!("{i:04}.png");
            img.save(dir.join(&name)).unwrap();
            images
                .push(serde_json::json!({"id": i + 1, "file_name": name, "width": w, "height": h}));
        }
        counts[s] = annotations.len();
        let doc = serde_json::json!({
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
        });
        std::fs::create_dir_all(root.join("annotations")).unwrap();
        std::fs::write(
            root.join("annotations")
                .join(format!("instances_{split}.json")),
            serde_json::to_string(&doc).unwrap(),
        )
        .unwrap();
    }
    counts
}

/// A tiny detection config on a [`detection_folder`] dataset: Faster R-CNN + FPN on a
/// ResNet-18-D at 64–80 px with small RPN/RoI sample counts, deterministic threads.
pub fn detection_config(dir: &Path, data: &Path, epochs: usize, extra: &str) -> PathBuf {
    let text = format!(
        r#"seed = 5
task = "detection"
[model]
name = "resnet18"
variant = "d"
[data]
dir = "{}"
format = "coco"
flip = true
workers = 2
[train]
epochs = {epochs}
batch_size = 2
threads = 1
[optim]
lr = 0.01
linear_scaling = false
weight_decay = 1e-4
[detect]
min_size = [64, 80]
max_size = 96
rpn_pre_nms_top_n_train = 200
rpn_post_nms_top_n_train = 100
rpn_pre_nms_top_n_test = 100
rpn_post_nms_top_n_test = 50
rpn_batch_size_per_image = 64
box_batch_size_per_image = 32
box_score_thresh = 0.01
eval_batch_size = 2
trainable_layers = 5
{extra}"#,
        data.display()
    );
    let path = dir.join("detect.toml");
    std::fs::write(&path, text).unwrap();
    path
}
