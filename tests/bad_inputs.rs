//! The corpus of bad inputs: every case ends in a clear error that names the file or key and the
//! problem, exit code != 0, no panic or backtrace, and nothing already written is damaged.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// Runs tricks and asserts a clean user-facing failure mentioning every needle.
fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail; stderr: {e}");
    assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
    assert!(e.lines().any(|l| l.starts_with("error: ")), "{args:?}: {e}");
    assert!(
        !e.contains("panicked") && !e.contains("backtrace") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
    for n in needles {
        assert!(e.contains(n), "{args:?}: expected {n:?} in: {e}");
    }
    e
}

struct Case {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
}

impl Case {
    fn new() -> Case {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let data = dir.join("data");
        image_folder(&data, 2, 4, 2, 16);
        Case {
            _tmp: tmp,
            dir,
            data,
        }
    }
    fn config(&self, extra: &str) -> String {
        tiny_config(&self.dir, &self.data, 1, extra)
            .to_str()
            .unwrap()
            .to_string()
    }
    fn out(&self) -> String {
        self.dir.join("run").to_str().unwrap().to_string()
    }
    fn train(&self, extra: &str, more: &[&str], needles: &[&str]) -> String {
        let (cfg, out) = (self.config(extra), self.out());
        let mut args = vec!["train", "--config", cfg.as_str(), "--out", out.as_str()];
        args.extend_from_slice(more);
        fails_with(&args, needles)
    }
    fn bad_image(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.data.join("train/class1").join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

fn jpeg_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([10, 200, 30]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

// ---- images ----

#[test]
fn truncated_jpeg() {
    let c = Case::new();
    let j = jpeg_bytes();
    c.bad_image("trunc.jpg", &j[..j.len() / 2]);
    c.train("", &[], &["trunc.jpg"]);
}

#[test]
fn zero_byte_file() {
    let c = Case::new();
    c.bad_image("empty.jpg", b"");
    c.train("", &[], &["empty.jpg"]);
}

#[test]
fn text_file_named_jpg() {
    let c = Case::new();
    c.bad_image("notes.jpg", b"this is not an image\n");
    c.train("", &[], &["notes.jpg"]);
}

#[test]
fn decompression_bomb_is_refused() {
    let c = Case::new();
    // A valid PNG header declaring 100000 x 100000 pixels.
    let mut png = Vec::new();
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    c.bad_image("bomb.png", &png);
    c.train("", &[], &["bomb.png"]);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn skip_bad_images_skips_and_counts() {
    let c = Case::new();
    c.bad_image("empty.jpg", b"");
    c.bad_image("notes.jpg", b"text");
    let (cfg, out) = (c.config(""), c.out());
    let o = run(&[
        "train",
        "--config",
        &cfg,
        "--out",
        &out,
        "--skip-bad-images",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped_images\":2"), "{metrics}");
}

#[test]
fn odd_png_bit_depths_and_greyscale_are_converted_not_refused() {
    let c = Case::new();
    let grey16 =
        image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(16, 16, image::Luma([40000]));
    grey16.save(c.data.join("train/class0/grey16.png")).unwrap();
    let rgba = image::RgbaImage::from_pixel(16, 16, image::Rgba([1, 2, 3, 100]));
    rgba.save(c.data.join("train/class0/rgba.png")).unwrap();
    let la = image::GrayAlphaImage::from_pixel(16, 16, image::LumaA([7, 9]));
    la.save(c.data.join("train/class1/la.png")).unwrap();
    std::fs::write(
        c.data.join("train/class1/README.txt"),
        "not an image, ignored",
    )
    .unwrap();
    let (cfg, out) = (c.config(""), c.out());
    let o = run(&["train", "--config", &cfg, "--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
}

// ---- layouts ----

#[test]
fn missing_data_folder() {
    let c = Case::new();
    c.train(
        "",
        &["--data", "/nonexistent/data/root"],
        &["/nonexistent/data/root"],
    );
}

#[test]
fn no_train_folder() {
    let c = Case::new();
    std::fs::remove_dir_all(c.data.join("train")).unwrap();
    c.train("", &[], &["train"]);
}

#[test]
fn no_class_folders() {
    let c = Case::new();
    std::fs::remove_dir_all(c.data.join("train")).unwrap();
    std::fs::create_dir_all(c.data.join("train")).unwrap();
    c.train("", &[], &["train"]);
}

#[test]
fn empty_class_folder() {
    let c = Case::new();
    std::fs::create_dir_all(c.data.join("train/class9")).unwrap();
    c.train("", &[], &["class9"]);
}

#[test]
fn train_and_val_with_different_classes() {
    let c = Case::new();
    std::fs::rename(c.data.join("val/class1"), c.data.join("val/other")).unwrap();
    c.train("", &[], &["class1"]);
}

#[test]
fn cifar_file_of_the_wrong_size() {
    let c = Case::new();
    let root = c.dir.join("cifar");
    std::fs::create_dir_all(&root).unwrap();
    for i in 1..=5 {
        std::fs::write(
            root.join(format!("data_batch_{i}.bin")),
            vec![0u8; 3073 * 2],
        )
        .unwrap();
    }
    std::fs::write(root.join("test_batch.bin"), vec![0u8; 3073 + 5]).unwrap();
    c.train("", &["--data", root.to_str().unwrap()], &["test_batch.bin"]);
}

// ---- config ----

#[test]
fn unknown_key() {
    Case::new().train("momentun = 0.9", &[], &["momentun"]);
}

#[test]
fn wrong_type() {
    Case::new().train(
        "",
        &["--set", "train.batch_size=\"eight\""],
        &["train.batch_size"],
    );
}

#[test]
fn negative_lr() {
    Case::new().train("", &["--set", "optim.lr=-0.1"], &["optim.lr"]);
}

#[test]
fn zero_batch() {
    Case::new().train("", &["--set", "train.batch_size=0"], &["train.batch_size"]);
}

#[test]
fn zero_epochs() {
    Case::new().train("", &["--set", "train.epochs=0"], &["train.epochs"]);
}

#[test]
fn unknown_variant() {
    Case::new().train("", &["--set", "model.variant=\"e\""], &["model.variant"]);
}

#[test]
fn impossible_depth() {
    Case::new().train(
        "",
        &["--set", "model.name=\"cifar_resnet21\""],
        &["model.name", "6n+2"],
    );
}

#[test]
fn unknown_model() {
    Case::new().train(
        "",
        &["--set", "model.name=\"vgg16\""],
        &["model.name", "vgg16"],
    );
}

#[test]
fn malformed_toml() {
    let c = Case::new();
    let p = c.dir.join("broken.toml");
    std::fs::write(&p, "[optim\nlr = 0.1\n").unwrap();
    fails_with(
        &["train", "--config", p.to_str().unwrap(), "--check"],
        &["broken.toml"],
    );
}

#[test]
fn missing_config_file() {
    fails_with(
        &["train", "--config", "/nonexistent/x.toml", "--check"],
        &["/nonexistent/x.toml"],
    );
}

#[test]
fn override_without_equals() {
    Case::new().train("", &["--set", "optim.lr"], &["optim.lr", "key=value"]);
}

#[test]
fn batch_larger_than_dataset() {
    Case::new().train(
        "",
        &["--set", "train.batch_size=1000"],
        &["train.batch_size"],
    );
}

#[test]
fn mixup_off_epochs_beyond_training() {
    Case::new().train(
        "[mixup]\nalpha = 0.2\noff_epochs = 5",
        &[],
        &["mixup.off_epochs"],
    );
}

#[test]
fn fp16_on_cpu() {
    Case::new().train(
        "",
        &["--set", "train.precision=\"fp16\""],
        &["train.precision"],
    );
}

#[test]
fn cuda_asked_for_but_unavailable() {
    if tch::Cuda::is_available() {
        return;
    }
    Case::new().train("", &["--device", "cuda"], &["CUDA"]);
}

/// Trains a tiny model to use as a teacher / checkpoint in the tests below.
fn trained(c: &Case, name: &str, extra_args: &[&str]) -> PathBuf {
    let cfg = c.config("");
    let out = c.dir.join(name);
    let mut args = vec![
        "train",
        "--config",
        cfg.as_str(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra_args);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

#[test]
fn teacher_with_another_class_count() {
    let c = Case::new();
    let t = trained(&c, "teacher", &[]);
    // A dataset with 3 classes for the student.
    let data3 = c.dir.join("data3");
    image_folder(&data3, 3, 4, 2, 16);
    let teacher = format!(
        "distill.teacher=\"{}\"",
        t.join("best.safetensors").display()
    );
    c.train(
        "",
        &["--data", data3.to_str().unwrap(), "--set", &teacher],
        &["distill.teacher", "2 classes"],
    );
}

#[test]
fn teacher_checkpoint_whose_tensors_do_not_match_its_architecture() {
    let c = Case::new();
    let t = trained(&c, "teacher", &[]);
    // Re-label the teacher's weights as a ResNet-14: its tensors no longer fit.
    let ck = tricks::checkpoint::load(&t.join("best.safetensors")).unwrap();
    let mut cfg = ck.config.clone().unwrap();
    cfg.model.name = "cifar_resnet14".into();
    let tensors: Vec<(String, tch::Tensor)> = ck
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let bad = c.dir.join("mislabelled.safetensors");
    tricks::checkpoint::save(&bad, &tensors, Some(&cfg), &ck.classes, None).unwrap();
    let teacher = format!("distill.teacher=\"{}\"", bad.display());
    c.train(
        "",
        &["--set", &teacher],
        &["distill.teacher", "mislabelled.safetensors", "missing"],
    );

    // Shape mismatch: names the tensor and both shapes.
    let mut shapes: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    for (k, v) in shapes.iter_mut() {
        if k == "fc.bias" {
            *v = tch::Tensor::zeros([5], (tch::Kind::Float, tch::Device::Cpu));
        }
    }
    let bad2 = c.dir.join("reshaped.safetensors");
    tricks::checkpoint::save(&bad2, &shapes, ck.config.as_ref(), &ck.classes, None).unwrap();
    let teacher = format!("distill.teacher=\"{}\"", bad2.display());
    c.train("", &["--set", &teacher], &["fc.bias", "[5]", "[2]"]);
}

// ---- runtime ----

#[test]
fn nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint() {
    let c = Case::new();
    let cfg = tiny_config(&c.dir, &c.data, 3, "");
    let out = c.dir.join("nan");
    let ok = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.epochs=1",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let good = tricks::checkpoint::epoch_checkpoint_path(&out.join("checkpoints"), 1);
    let before = std::fs::read(&good).unwrap();
    // Resume the same run with an absurd lr: the config differs, so use a fresh run instead and
    // check the message; then check the good run's checkpoint is untouched.
    let out2 = c.dir.join("nan2");
    let e = fails_with(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
            "--set",
            "optim.lr=1e30",
        ],
        &["loss became", "step"],
    );
    assert!(e.contains("last good checkpoint"), "{e}");
    assert_eq!(std::fs::read(&good).unwrap(), before);
}

#[test]
fn output_folder_cannot_be_created() {
    let c = Case::new();
    let file = c.dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (cfg, out) = (c.config(""), file.join("sub").to_str().unwrap().to_string());
    fails_with(&["train", "--config", &cfg, "--out", &out], &["a-file"]);
}

#[test]
fn resume_with_a_changed_config_is_refused() {
    let c = Case::new();
    let out = trained(&c, "run", &["--set", "train.epochs=1"]);
    let cfg = c.config("");
    fails_with(
        &[
            "train",
            "--config",
            &cfg,
            "--out",
            out.to_str().unwrap(),
            "--resume",
            "--set",
            "optim.lr=0.3",
        ],
        &["config differs"],
    );
}

#[test]
fn corrupt_checkpoint_for_eval() {
    let c = Case::new();
    let out = trained(&c, "run", &[]);
    let best = out.join("best.safetensors");
    // `--split` chooses a detection split; a classification checkpoint refuses it.
    fails_with(
        &[
            "eval",
            "--checkpoint",
            best.to_str().unwrap(),
            "--split",
            "train",
        ],
        &["best.safetensors", "--split train", "detection checkpoints"],
    );
    let mut bytes = std::fs::read(&best).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&best, &bytes).unwrap();
    fails_with(
        &[
            "eval",
            "--checkpoint",
            best.to_str().unwrap(),
            "--data",
            c.data.to_str().unwrap(),
        ],
        &["best.safetensors", "checksum"],
    );
}

#[test]
fn pickle_checkpoint_is_refused() {
    let c = Case::new();
    let p = c.dir.join("model.pth");
    // The first bytes of a pickled torch file (zip) — never unpickled.
    std::fs::write(&p, b"PK\x03\x04\x14\x00\x00\x00\x00\x00archive/data.pkl").unwrap();
    fails_with(
        &[
            "eval",
            "--checkpoint",
            p.to_str().unwrap(),
            "--data",
            c.data.to_str().unwrap(),
        ],
        &["model.pth", "safetensors"],
    );
}

#[test]
fn resume_skips_a_torn_newest_checkpoint() {
    let c = Case::new();
    let cfg = c.config("");
    let out = c.dir.join("run");
    let o = run(&[
        "train",
        "--config",
        &cfg,
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.epochs=2",
        "--set",
        "optim.step_epochs=[1]",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let newest = tricks::checkpoint::epoch_checkpoint_path(&out.join("checkpoints"), 2);
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() - 100]).unwrap();
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let o = run(&[
        "train",
        "--config",
        &cfg,
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--set",
        "train.epochs=2",
        "--set",
        "optim.step_epochs=[1]",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("epoch-0002") && e.contains("falling back"),
        "{e}"
    );
    assert!(e.contains("epoch-0001"), "{e}");
    // The epoch was redone and a valid checkpoint 2 exists again.
    assert!(tricks::checkpoint::load(&newest).is_ok());
}

#[test]
fn disk_full_while_writing_a_checkpoint_keeps_the_previous_one() {
    // A private mount namespace with a tiny tmpfs as the output disk: the first epoch's files fit,
    // a later checkpoint does not.
    let c = Case::new();
    let mnt = c.dir.join("disk");
    std::fs::create_dir_all(&mnt).unwrap();
    let cfg = c.config("");
    let bin = env!("CARGO_BIN_EXE_tricks");
    let script = format!(
        "mount -t tmpfs -o size=1400k tmpfs {m} || exit 99
{bin} train --config {cfg} --out {m}/run --set train.epochs=4 --set optim.step_epochs=[3]
echo TRAIN_RC=$?
ls -a {m}/run/checkpoints
{bin} eval --checkpoint {m}/run/checkpoints/epoch-0001.safetensors --data {d}
echo EVAL_RC=$?",
        m = mnt.display(),
        d = c.data.display()
    );
    let o = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let (out, err) = (stdout(&o), stderr(&o));
    assert_ne!(
        o.status.code(),
        Some(99),
        "cannot mount a tmpfs here: {err}"
    );
    assert!(out.contains("TRAIN_RC=1"), "{out}\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains("cannot save checkpoint"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.contains("epoch-0001.safetensors") && !out.contains(".tmp-"),
        "{out}"
    );
    assert!(
        out.contains("EVAL_RC=0") && out.contains("top-1"),
        "the previous checkpoint must still verify: {out}\n{err}"
    );
}

// ---- issue 23, second round ----

/// Runs tricks with a time limit (a walk that never ends must fail the test, not hang it).
fn run_bounded(args: &[&str], secs: u64) -> std::process::Output {
    let o = std::process::Command::new("timeout")
        .arg(secs.to_string())
        .arg(env!("CARGO_BIN_EXE_tricks"))
        .args(args)
        .output()
        .expect("timeout");
    assert_ne!(o.status.code(), Some(124), "{args:?} ran past {secs} s");
    o
}

fn check_ok(c: &Case) -> (String, String) {
    let cfg = c.config("");
    let o = run_bounded(&["train", "--config", &cfg, "--check"], 120);
    assert!(o.status.success(), "{}", stderr(&o));
    (stdout(&o), stderr(&o))
}

#[test]
fn directory_symlink_loops_are_skipped_named_and_bounded() {
    use std::os::unix::fs::symlink;
    let c = Case::new();
    // A link to the split folder (every class again), two self-links in one class, four in the
    // other (4^16 paths: the walk used to hang).
    symlink("..", c.data.join("train/class0/up")).unwrap();
    for i in 0..2 {
        symlink(".", c.data.join(format!("train/class0/self{i}"))).unwrap();
    }
    for i in 0..4 {
        symlink(".", c.data.join(format!("train/class1/loop{i}"))).unwrap();
    }
    let (out, err) = check_ok(&c);
    assert!(
        out.contains("data: ok (8 training and 4 evaluation images")
            && out.contains("7 entries skipped"),
        "{out}"
    );
    assert!(
        err.contains("class0/up")
            && err.contains("class1/loop3")
            && err.contains("folder already listed"),
        "{err}"
    );
    // A link to a folder outside the split is followed once.
    let extra = c.dir.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("x.jpg"), jpeg_bytes()).unwrap();
    symlink(&extra, c.data.join("train/class1/extra")).unwrap();
    let (out, _) = check_ok(&c);
    assert!(out.contains("data: ok (9 training"), "{out}");
}

#[test]
fn a_file_symlink_loop_is_named_not_skipped_silently() {
    let c = Case::new();
    std::os::unix::fs::symlink("loop.jpg", c.data.join("train/class1/loop.jpg")).unwrap();
    let (out, err) = check_ok(&c);
    assert!(out.contains("1 entries skipped"), "{out}");
    assert!(
        err.contains("warning:") && err.contains("class1/loop.jpg (symbolic link loop)"),
        "{err}"
    );
}

/// A copy of `src` with `edit` applied to its tensors (saved with a valid checksum).
fn edited_checkpoint(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&str, &tch::Tensor) -> Option<tch::Tensor>,
) -> String {
    let ck = tricks::checkpoint::load(src).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = ck
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), edit(k, v).unwrap_or_else(|| v.shallow_clone())))
        .collect();
    tricks::checkpoint::save(dst, &tensors, ck.config.as_ref(), &ck.classes, None).unwrap();
    dst.to_str().unwrap().to_string()
}

fn eval_args<'a>(ckpt: &'a str, data: &'a str) -> Vec<&'a str> {
    vec!["eval", "--checkpoint", ckpt, "--data", data]
}

#[test]
fn checkpoint_with_a_wrong_or_integer_weight_names_that_tensor() {
    let c = Case::new();
    let best = trained(&c, "run", &[]).join("best.safetensors");
    let data = c.data.to_str().unwrap();
    let wide = edited_checkpoint(&best, &c.dir.join("wide.safetensors"), |k, v| {
        (k == "fc.weight").then(|| tch::Tensor::zeros([5, v.size()[1]], (v.kind(), v.device())))
    });
    let e = fails_with(
        &eval_args(&wide, data),
        &["wide.safetensors", "`fc.weight`", "[5, 64]"],
    );
    assert!(!e.contains("fc.bias"), "{e}");
    let ints = edited_checkpoint(&best, &c.dir.join("ints.safetensors"), |k, v| {
        (k == "conv1.weight").then(|| v.to_kind(tch::Kind::Int64))
    });
    fails_with(
        &eval_args(&ints, data),
        &["ints.safetensors", "`conv1.weight`", "Int64"],
    );
}

#[test]
fn eval_on_other_class_names_lists_them() {
    let c = Case::new();
    let best = trained(&c, "run", &[]).join("best.safetensors");
    let other = c.dir.join("other");
    image_folder(&other, 2, 1, 2, 16);
    std::fs::rename(other.join("val/class1"), other.join("val/zebra")).unwrap();
    fails_with(
        &eval_args(best.to_str().unwrap(), other.to_str().unwrap()),
        &[
            "2 vs 2 classes",
            "only in the dataset: [zebra]",
            "only in the checkpoint: [class1]",
        ],
    );
}

#[test]
fn eval_of_non_finite_weights_fails_naming_the_tensor() {
    let c = Case::new();
    let best = trained(&c, "run", &[]).join("best.safetensors");
    let nan = edited_checkpoint(&best, &c.dir.join("nan.safetensors"), |k, v| {
        (k == "layer2.0.bn1.running_var" || k == "layer3.0.conv1.weight")
            .then(|| v.full_like(f64::NAN))
    });
    let e = fails_with(
        &eval_args(&nan, c.data.to_str().unwrap()),
        &[
            "nan.safetensors",
            "`layer2.0.bn1.running_var`",
            "non-finite",
        ],
    );
    assert!(!e.contains("top-1"), "{e}");
}

#[test]
fn zero_batch_for_bench_and_zero_jobs_for_ablate_are_refused() {
    for (args, flag) in [
        (vec!["bench", "--batch", "0", "--steps", "1"], "--batch"),
        (
            vec!["ablate", "--study", "s.toml", "--out", "o", "--jobs", "0"],
            "--jobs",
        ),
    ] {
        let o = run(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {e}");
        assert!(e.contains(flag) && e.contains("1 or more"), "{e}");
        assert!(!stdout(&o).contains("img/s"), "{}", stdout(&o));
    }
}

#[test]
fn huge_values_are_cut_and_unbounded_ranges_read_as_written() {
    let c = Case::new();
    let huge = "x".repeat(10_000_000);
    let e = c.train(
        &format!("[finetune]\nmode = \"{huge}\""),
        &["--check"],
        &["finetune.mode", "bytes)", "linear_probe"],
    );
    assert!(e.len() < 2000, "{} bytes of stderr", e.len());
    let e = c.train(
        "",
        &["--check", "--set", "optim.clip_grad_norm=-1"],
        &["optim.clip_grad_norm", ">= 0"],
    );
    assert!(!e.contains("1797693134862315"), "{e}");
}

#[test]
fn settings_that_never_take_effect_are_warned_about_by_check_and_train() {
    let c = Case::new();
    // tiny_config trains 1 epoch with optim.step_epochs = [2]: the lr never decays.
    let (out, err) = check_ok(&c);
    assert!(out.contains("config: ok"), "{out}");
    assert!(
        err.contains("warning: key `optim.step_epochs`: [2]") && err.contains("never decays"),
        "{err}"
    );
    let cfg = c.config("[mixup]\nalpha = 0.2\noff_epochs = 1");
    let o = run(&[
        "train",
        "--config",
        &cfg,
        "--check",
        "--set",
        "optim.warmup_epochs=1.0",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    for key in [
        "optim.step_epochs",
        "mixup.off_epochs",
        "optim.warmup_epochs",
    ] {
        assert!(
            err.contains(&format!("warning: key `{key}`")),
            "{key}: {err}"
        );
    }
    // Training says the same at its start.
    let out = c.dir.join("warned");
    let o = run(&[
        "train",
        "--config",
        &c.config(""),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: key `optim.step_epochs`"),
        "{}",
        stderr(&o)
    );
    // Nothing to say when the schedule fits the run.
    let o = run(&[
        "train",
        "--config",
        &c.config(""),
        "--check",
        "--set",
        "optim.step_epochs=[]",
    ]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn a_tricks_checkpoint_without_its_checksum_loads_with_a_warning() {
    let c = Case::new();
    let best = trained(&c, "run", &[]).join("best.safetensors");
    let bytes = std::fs::read(&best).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    assert_eq!(meta["format"], tricks::checkpoint::FORMAT);
    meta.remove("sha256");
    let stripped = c.dir.join("stripped.safetensors");
    std::fs::write(
        &stripped,
        safetensors::serialize(st.tensors(), &Some(meta.clone())).unwrap(),
    )
    .unwrap();
    let data = c.data.to_str().unwrap();
    let o = run(&eval_args(stripped.to_str().unwrap(), data));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("stripped.safetensors") && e.contains("sha256") && e.contains("unverified"),
        "{e}"
    );
    // External weights (no `format` key) load quietly, as before.
    meta.remove("format");
    let external = c.dir.join("external.safetensors");
    std::fs::write(
        &external,
        safetensors::serialize(st.tensors(), &Some(meta)).unwrap(),
    )
    .unwrap();
    let o = run(&eval_args(external.to_str().unwrap(), data));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn a_segmentation_image_link_loop_is_named_not_skipped_silently() {
    let tmp = tempfile::tempdir().unwrap();
    segmentation_folder(tmp.path(), 2, 1, 16, 16);
    let images = tmp.path().join("train/images");
    std::os::unix::fs::symlink("loop.png", images.join("loop.png")).unwrap();
    let ds = tricks::segment::SegDataset::open(&tmp.path().join("train")).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(
        ds.skipped(),
        &[(images.join("loop.png"), "symbolic link loop".to_string())]
    );
}
