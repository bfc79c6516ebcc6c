//! End-to-end: `tricks train` / `eval` / `--check` / `--resume` on a generated dataset.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tricks::checkpoint;
use tricks::classify::EpochMetrics;

fn metrics(out: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_writes_every_output_and_eval_reads_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 6, 16);
    let cfg = tiny_config(tmp.path(), &data, 2, "");
    let out = tmp.path().join("run");
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "optim.lr=0.02",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("done: 2 epochs"), "{}", stdout(&o));

    // Resolved config carries the override.
    let resolved = tricks::config::Config::load(&out.join("config.toml"), &[]).unwrap();
    assert_eq!(resolved.optim.lr, 0.02);
    // One metrics line per epoch with every field.
    let m = metrics(&out);
    assert_eq!(m.iter().map(|m| m.epoch).collect::<Vec<_>>(), vec![1, 2]);
    for line in &m {
        assert!(line.train_loss.is_finite() && line.images_per_second > 0.0 && line.seconds > 0.0);
        // The first batch of an epoch is always waited for (nothing is prefetched yet).
        assert!(
            line.data_wait_seconds > 0.0 && line.data_wait_seconds < line.seconds,
            "{line:?}"
        );
        let top1 = line.val_top1.unwrap();
        assert!((0.0..=100.0).contains(&top1) && line.val_top5.unwrap() >= top1);
        // Every epoch is evaluated here; the evaluation is part of the epoch's time, and the
        // training part of it is at least the images over the training throughput.
        let train_part = 48.0 / line.images_per_second;
        assert!(
            line.eval_seconds > 0.0 && line.eval_seconds + train_part <= line.seconds + 1e-6,
            "{line:?}"
        );
    }
    let raw = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for key in [
        "epoch",
        "lr",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "images_per_second",
        "seconds",
        "data_wait_seconds",
        "eval_seconds",
    ] {
        assert!(
            raw.lines().next().unwrap().contains(&format!("\"{key}\"")),
            "{key}"
        );
    }
    // Checkpoints: epoch files with state, best weights, summary.
    let ckpts = checkpoint::list_epoch_checkpoints(&out.join("checkpoints"));
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 1]);
    let last = checkpoint::load(&ckpts[0].1).unwrap();
    let state = last.state.unwrap();
    assert_eq!(state.epochs_done, 2);
    assert_eq!(state.global_step, 2 * (48 / 8));
    assert!(last
        .tensors
        .keys()
        .any(|k| k.starts_with("optim.momentum.")));
    assert_eq!(last.classes, vec!["class0", "class1", "class2"]);
    let summary: tricks::classify::RunSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.epochs, 2);
    assert_eq!(summary.final_top1, m[1].val_top1.unwrap());

    // eval reproduces the final validation accuracy from the last checkpoint, also in
    // channels_last (on a CPU, through the fused inference batch norm).
    let eval = |checkpoint: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let expected = format!("top-1 {:.2}%", m[1].val_top1.unwrap());
    for extra in [&[][..], &["--channels-last"]] {
        let o = eval(&ckpts[0].1, extra);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains(&expected),
            "{extra:?}: {} vs {expected}",
            stdout(&o)
        );
    }
    let o = eval(&out.join("best.safetensors"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Test-time flip is off unless asked for (the run's train.eval_flip is false).
    let o = eval(&ckpts[0].1, &["--flip", "false"]);
    assert!(stdout(&o).contains(&expected), "{}", stdout(&o));
    let o = eval(&ckpts[0].1, &["--flip", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("each with its mirror image"),
        "{}",
        stdout(&o)
    );
    let o = eval(&ckpts[0].1, &["--precision", "fp8"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown precision \"fp8\""),
        "{}",
        stderr(&o)
    );

    // A second plain `train` into the same folder refuses instead of overwriting.
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
}

#[test]
fn check_validates_config_and_data_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 2, 4, 2, 16);
    let cfg = tiny_config(tmp.path(), &data, 1, "");
    let out = tmp.path().join("run");
    let c = cfg.to_str().unwrap();
    let o = run(&[
        "train",
        "--config",
        c,
        "--out",
        out.to_str().unwrap(),
        "--check",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("data: ok (8 training and 4 evaluation images, 2 classes"),
        "{}",
        stdout(&o)
    );
    assert!(!out.exists(), "--check must not create outputs");

    for (args, needle) in [
        (vec!["--set", "optim.lrr=1"], "lrr"),
        (vec!["--set", "optim.lr=-1"], "optim.lr"),
        (vec!["--set", "model.variant=\"z\""], "model.variant"),
        (vec!["--set", "train.epochs=\"x\""], "train.epochs"),
        (vec!["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (
            vec!["--set", "distill.teacher=\"/nonexistent/t.safetensors\""],
            "distill.teacher",
        ),
        (vec!["--device", "cuda:7"], "CUDA"),
    ] {
        let mut full = vec!["train", "--config", c, "--check"];
        full.extend(args.iter());
        let o = run(&full);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(
            e.lines().any(|l| l.starts_with("error: "))
                && !e.contains("panicked")
                && !e.contains("stack backtrace"),
            "{e}"
        );
    }
}

fn tensors_of(path: &Path) -> BTreeMap<String, tch::Tensor> {
    checkpoint::load(path).unwrap().tensors
}

#[test]
fn resume_after_kill_9_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 160, 6, 16);
    let cfg = tiny_config(tmp.path(), &data, 3, "");
    let c = cfg.to_str().unwrap();

    let straight = tmp.path().join("straight");
    let o = run(&["train", "--config", c, "--out", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = tmp.path().join("killed");
    kill_after_first_epoch(c, &killed, Duration::from_millis(150));
    resume(c, &killed);

    let a = tensors_of(&checkpoint::epoch_checkpoint_path(
        &straight.join("checkpoints"),
        3,
    ));
    let b = tensors_of(&checkpoint::epoch_checkpoint_path(
        &killed.join("checkpoints"),
        3,
    ));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "tensor {k} differs after resume");
    }
    let (ma, mb) = (metrics(&straight), metrics(&killed));
    assert_eq!(ma.len(), 3);
    assert_eq!(mb.len(), 3);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (
                x.epoch,
                x.lr,
                x.train_loss,
                x.train_top1,
                x.val_loss,
                x.val_top1,
                x.val_top5
            ),
            (
                y.epoch,
                y.lr,
                y.train_loss,
                y.train_top1,
                y.val_loss,
                y.val_top1,
                y.val_top5
            )
        );
    }
}

#[test]
fn finetune_loads_the_backbone_and_replaces_only_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let data2 = tmp.path().join("data2");
    image_folder(&data2, 2, 8, 2, 16);
    let data3 = tmp.path().join("data3");
    image_folder(&data3, 3, 8, 2, 16);
    let cfg = tiny_config(tmp.path(), &data2, 1, "");
    let c = cfg.to_str().unwrap();
    let src = tmp.path().join("src");
    let o = run(&["train", "--config", c, "--out", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let src_ckpt = src.join("best.safetensors");

    let probe = tmp.path().join("probe");
    let o = run(&[
        "finetune",
        "--from",
        src_ckpt.to_str().unwrap(),
        "--linear-probe",
        "--config",
        c,
        "--data",
        data3.to_str().unwrap(),
        "--out",
        probe.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("linear probe"), "{}", stderr(&o));
    let before = tensors_of(&src_ckpt);
    let after = tensors_of(&probe.join("best.safetensors"));
    for (k, t) in &after {
        if k.starts_with("fc.") {
            assert_eq!(t.size()[0], 3, "{k} must be re-made for 3 classes");
        } else {
            // Frozen backbone, BN in eval mode: weights and running statistics are untouched.
            assert!(t.equal(&before[k]), "{k} changed during a linear probe");
        }
    }
    assert_eq!(before["fc.weight"].size()[0], 2);

    // Full fine-tuning starts from the same backbone and changes it.
    let full = tmp.path().join("full");
    let o = run(&[
        "finetune",
        "--from",
        src_ckpt.to_str().unwrap(),
        "--config",
        c,
        "--data",
        data3.to_str().unwrap(),
        "--out",
        full.to_str().unwrap(),
        "--set",
        "train.max_steps=1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A checkpoint whose tensor shapes differ: the error names the tensor and both shapes.
    let mut bad: Vec<(String, tch::Tensor)> = before
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    for (k, v) in bad.iter_mut() {
        if k == "conv1.weight" {
            *v = tch::Tensor::zeros([16, 3, 5, 5], (tch::Kind::Float, tch::Device::Cpu));
        }
    }
    let bad_path = tmp.path().join("bad.safetensors");
    checkpoint::save(&bad_path, &bad, None, &[], None).unwrap();
    let o = run(&[
        "finetune",
        "--from",
        bad_path.to_str().unwrap(),
        "--config",
        c,
        "--data",
        data3.to_str().unwrap(),
        "--out",
        tmp.path().join("bad").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("conv1.weight") && e.contains("[16, 3, 5, 5]") && e.contains("[16, 3, 3, 3]"),
        "{e}"
    );
}

#[test]
fn sigterm_checkpoints_mid_epoch_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 200, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, 2, "[mixup]\nalpha = 0.2\n");
    let c = cfg.to_str().unwrap();

    let straight = tmp.path().join("straight");
    let o = run(&["train", "--config", c, "--out", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let stopped = tmp.path().join("stopped");
    let child = tricks()
        .args(["train", "--config", c, "--out", stopped.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !stopped.join("config.toml").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200)); // into epoch 1
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    let finished = stopped.join("summary.json").exists();
    assert_eq!(
        o.status.code(),
        Some(if finished { 0 } else { 143 }),
        "a SIGTERM must end the run with status 143 once its checkpoint is written: {e}"
    );
    let interrupt = stopped.join("checkpoints").join(checkpoint::INTERRUPT_FILE);
    if !interrupt.exists() {
        // The run was faster than the signal; the test cannot say anything then.
        assert!(stopped.join("summary.json").exists(), "{e}");
        eprintln!("note: the run finished before SIGTERM arrived; mid-epoch path not exercised");
        return;
    }
    assert!(
        e.contains("checkpoint written to") && e.contains("interrupt.safetensors"),
        "{e}"
    );
    let state = checkpoint::load(&interrupt).unwrap().state.unwrap();
    assert!(state.batch_in_epoch > 0, "{state:?}");

    let o = run(&[
        "train",
        "--config",
        c,
        "--out",
        stopped.to_str().unwrap(),
        "--resume",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !interrupt.exists(),
        "the interrupt checkpoint is removed once its epoch is done"
    );
    let a = tensors_of(&checkpoint::epoch_checkpoint_path(
        &straight.join("checkpoints"),
        2,
    ));
    let b = tensors_of(&checkpoint::epoch_checkpoint_path(
        &stopped.join("checkpoints"),
        2,
    ));
    for (k, t) in &a {
        assert!(
            t.equal(&b[k]),
            "tensor {k} differs after a mid-epoch resume"
        );
    }
    let (ma, mb) = (metrics(&straight), metrics(&stopped));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x.epoch, x.train_loss, x.train_top1, x.val_top1),
            (y.epoch, y.train_loss, y.train_top1, y.val_top1)
        );
    }
}

/// Trains the tiny config (2 epochs on `per_class` images of each of 3 classes) twice, with
/// `--set key=false` and `--set key=true`, requires the same weights, BN statistics and metrics,
/// and returns both logs.
fn trains_identically_with_and_without(
    key: &str,
    per_class: usize,
    val_per_class: usize,
) -> (String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, per_class, val_per_class, 16);
    let cfg = tiny_config(tmp.path(), &data, 2, "");
    same_training_with_and_without(&cfg, tmp.path(), key, &[], 2)
}

/// Trains `cfg` (with the `sets`) for `epochs` epochs with `key` false, then true, and asserts
/// that the last checkpoints (weights, BN statistics, optimiser state) and the per-epoch metrics
/// are the same; returns the two logs.
fn same_training_with_and_without(
    cfg: &Path,
    dir: &Path,
    key: &str,
    sets: &[&str],
    epochs: usize,
) -> (String, String) {
    let train = |out: &Path, on: bool| {
        let flag = format!("{key}={on}");
        let mut args = vec![
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--set",
            &flag,
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let (a, b) = (dir.join("off"), dir.join("on"));
    let logs = (train(&a, false), train(&b, true));
    let last = format!("checkpoints/epoch-{epochs:04}.safetensors");
    let wa = checkpoint::load(&a.join(&last)).unwrap();
    let wb = checkpoint::load(&b.join(&last)).unwrap();
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for (k, t) in &wa.tensors {
        assert!(t.equal(&wb.tensors[k]), "{k} differs");
    }
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), epochs);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x.train_loss, x.val_top1, x.val_loss),
            (y.train_loss, y.val_top1, y.val_loss)
        );
    }
    logs
}

/// `data.on_device`: the dataset decoded once into device memory and augmented there gives the
/// same training as the CPU loader (same batches, so the same weights and metrics).
#[test]
fn device_resident_data_trains_exactly_like_the_loader() {
    let (_, log) = trains_identically_with_and_without("data.on_device", 8, 4);
    assert!(log.contains("24 + 12 images decoded"), "{log}");
}

/// airbench94's recipe end to end on 32-px images (its network needs them): every switch of
/// configs/cifar10/airbench94.toml on, a run killed after its first epoch resumes to the very
/// weights, momentum and lookahead state of a straight run, and so does a run from the images in
/// device memory (`data.on_device`); the whitening conv's weights never
/// train and its bias stops after `whiten_bias_epochs`; BN scales stay 1; the run ends on the
/// lookahead average.
#[test]
fn airbench94_recipe_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 48, 4, 32);
    let cfg = airbench_config(tmp.path(), &data, 4, 3);
    let c = cfg.to_str().unwrap();

    let straight = tmp.path().join("straight");
    let o = run(&["train", "--config", c, "--out", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("whitening conv set"), "{}", stderr(&o));

    let killed = tmp.path().join("killed");
    kill_after_first_epoch(c, &killed, Duration::ZERO);
    // The resumed run takes its whitening conv from the checkpoint, without computing it again.
    let o = run(&[
        "train",
        "--config",
        c,
        "--out",
        killed.to_str().unwrap(),
        "--resume",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("resuming from"), "{log}");
    assert!(!log.contains("whitening conv set"), "{log}");

    let epoch = |out: &Path, e| {
        tensors_of(&checkpoint::epoch_checkpoint_path(
            &out.join("checkpoints"),
            e,
        ))
    };
    let (a, b) = (epoch(&straight, 4), epoch(&killed, 4));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "tensor {k} differs after resume");
    }
    // With the images decoded into device memory, the whitening comes from them (not from a
    // second decode through the loader) and the training is the same, tensor for tensor.
    let resident = tmp.path().join("resident");
    let o = run(&[
        "train",
        "--config",
        c,
        "--out",
        resident.to_str().unwrap(),
        "--set",
        "data.on_device=true",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let (decoded, whitened) = (log.find("images decoded"), log.find("whitening conv set"));
    assert!(
        matches!((decoded, whitened), (Some(d), Some(w)) if d < w),
        "{log}"
    );
    let r = epoch(&resident, 4);
    for (k, t) in &a {
        assert!(t.equal(&r[k]), "tensor {k} differs with data.on_device");
    }
    // The run ends on the slow weights, which the checkpoint carries for resuming.
    assert!(a.contains_key("optim.lookahead.block1.conv1.weight"));
    for (k, t) in a.iter().filter(|(k, _)| !k.starts_with("optim.")) {
        assert!(
            t.equal(&a[&format!("optim.lookahead.{k}")]),
            "{k} is not the average"
        );
    }
    let e1 = epoch(&straight, 1);
    assert!(a["whiten.weight"].equal(&e1["whiten.weight"]));
    // ... and they are the whitening init's: lookahead's averages start from them (a run
    // without lookahead keeps them as set).
    let plain = tmp.path().join("plain");
    let o = run(&[
        "train",
        "--config",
        c,
        "--out",
        plain.to_str().unwrap(),
        "--set",
        "optim.lookahead=false",
        "--set",
        "train.epochs=1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(a["whiten.weight"].equal(&epoch(&plain, 1)["whiten.weight"]));
    assert!(
        a["whiten.bias"].equal(&e1["whiten.bias"]),
        "trained after epoch 1"
    );
    assert!(
        a["whiten.bias"]
            .abs()
            .sum(tch::Kind::Float)
            .double_value(&[])
            > 0.0
    );
    assert!(a["block1.norm1.weight"].eq(1.0).all().int64_value(&[]) == 1);
    assert!(!a["block1.norm1.bias"].equal(&e1["block1.norm1.bias"]));
    let m = metrics(&straight);
    assert_eq!(m.len(), 4);
    assert!(m.iter().all(|e| e.val_top1.is_some()));
}

/// `train.untimed_warmup` only moves set-up out of the first epoch: the run with it trains to
/// the very weights, BN statistics and metrics of the run without it.
#[test]
fn untimed_warmup_changes_nothing() {
    let (off, on) = trains_identically_with_and_without("train.untimed_warmup", 8, 3);
    assert!(!off.contains("untimed warm-up"));
    assert!(on.contains("untimed warm-up"));
}

/// The warm-up's training step (label smoothing, the optimiser step, a lookahead average, the
/// device-resident augmentation) leaves no trace either: airbench94's recipe, lookahead every 2
/// steps, trains to the same weights, momentum and slow weights with and without it.
#[test]
fn untimed_warmup_with_airbench94s_recipe_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 8, 2, 32);
    let cfg = airbench_config(tmp.path(), &data, 2, 2);
    let (off, on) = same_training_with_and_without(
        &cfg,
        tmp.path(),
        "train.untimed_warmup",
        &["data.on_device=true"],
        2,
    );
    assert!(!off.contains("untimed warm-up") && on.contains("untimed warm-up"));
    let ckpt = checkpoint::load(&tmp.path().join("on/checkpoints/epoch-0002.safetensors")).unwrap();
    // The comparison covered the optimiser's state, not only the weights.
    assert!(ckpt
        .tensors
        .keys()
        .any(|k| k.starts_with(checkpoint::MOMENTUM_PREFIX)));
    assert!(ckpt.tensors.keys().any(|k| k.contains("lookahead")));
}
