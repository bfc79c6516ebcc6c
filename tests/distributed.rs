//! Data-parallel training over c10d/Gloo on loopback with 2 processes on this CPU.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use tricks::checkpoint;

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    checkpoint::load(path)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .tensors
}

/// ‖a − b‖ / ‖b‖ over the tensors of `b` whose name `selects`.
fn relative_l2(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    selects: impl Fn(&str) -> bool,
) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (k, tb) in b.iter().filter(|(k, _)| selects(k)) {
        let ta = a.get(k).unwrap_or_else(|| panic!("{k} missing"));
        diff += f64::try_from((ta - tb).to_kind(Kind::Double).square().sum(Kind::Double)).unwrap();
        norm += f64::try_from(tb.to_kind(Kind::Double).square().sum(Kind::Double)).unwrap();
    }
    (diff / norm).sqrt()
}

fn is_weight(name: &str) -> bool {
    !name.starts_with("optim.") && !name.contains("running_") && !name.contains("num_batches")
}

/// `cfg` trained for `epochs` as 2 ranks of batch 8 (`launch`, with `dist_sets` too) and as one
/// process of batch 16, both with `sets`; the two replicas must end bit-identical.
struct TwoRanksAndOne {
    log: String,
    dist_out: PathBuf,
    single_out: PathBuf,
    /// Rank 0's replica.
    r0: BTreeMap<String, Tensor>,
    /// The last epoch's checkpoints.
    dist_ckpt: BTreeMap<String, Tensor>,
    single_ckpt: BTreeMap<String, Tensor>,
}

fn two_ranks_and_one(
    dir: &Path,
    cfg: &str,
    epochs: usize,
    sets: &[&str],
    dist_sets: &[&str],
) -> TwoRanksAndOne {
    let with_sets = |c: &mut Command, sets: &[&str]| {
        for s in sets {
            c.args(["--set", s]);
        }
    };
    let dist_out = dir.join("dist");
    let replicas = dir.join("replicas");
    let mut c = tricks();
    c.args(["launch", "--nproc", "2", "--", "train", "--config", cfg])
        .args([
            "--out",
            dist_out.to_str().unwrap(),
            "--set",
            "train.batch_size=8",
        ])
        .env("TRICKS_DEBUG_RANK_WEIGHTS", &replicas);
    with_sets(&mut c, sets);
    with_sets(&mut c, dist_sets);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let single_out = dir.join("single");
    let mut c = tricks();
    c.args([
        "train",
        "--config",
        cfg,
        "--out",
        single_out.to_str().unwrap(),
    ])
    .args(["--set", "train.batch_size=16"]);
    with_sets(&mut c, sets);
    let single = c.output().unwrap();
    assert!(single.status.success(), "{}", stderr(&single));

    let r0 = tensors(&replicas.join("rank0.safetensors"));
    let r1 = tensors(&replicas.join("rank1.safetensors"));
    assert!(!r0.is_empty());
    for (k, t) in &r0 {
        assert!(t.equal(&r1[k]), "replicas differ in {k}");
    }
    let last = |out: &Path| {
        tensors(&checkpoint::epoch_checkpoint_path(
            &out.join("checkpoints"),
            epochs,
        ))
    };
    TwoRanksAndOne {
        log: stderr(&o),
        dist_ckpt: last(&dist_out),
        single_ckpt: last(&single_out),
        dist_out,
        single_out,
        r0,
    }
}

/// After one epoch of 3 global batches the two replicas hold bit-identical weights, and those
/// weights match one process trained on the same global batch (16 = 2 × 8): same samples,
/// same augmentation, gradients averaged by the Reducer, BN statistics over the global batch
/// (`sync_bn`). The tolerance is float summation order: relative L2 error below 1e-4 over all
/// weights (measured 4e-8 here).
#[test]
fn two_ranks_train_like_one_process_on_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, 1, "");
    let t = two_ranks_and_one(
        tmp.path(),
        cfg.to_str().unwrap(),
        1,
        &["optim.lr=0.01"],
        &["distributed.sync_bn=true"],
    );
    let log = &t.log;
    assert!(
        log.contains("2 ranks over Gloo, batch 8 per rank = 16 global, batch norm synchronised"),
        "{log}"
    );
    // Only rank 0 logs the epoch line.
    assert_eq!(log.matches("epoch 1/1:").count(), 1, "{log}");

    // Rank 0's checkpoint is its replica.
    assert_eq!(relative_l2(&t.dist_ckpt, &t.r0, is_weight), 0.0);

    let err = relative_l2(&t.r0, &t.single_ckpt, is_weight);
    assert!(err < 1e-4, "2 ranks vs 1 process: relative L2 {err}");
    let err = relative_l2(&t.r0, &t.single_ckpt, |k| k.contains("running_"));
    assert!(err < 1e-4, "BN running statistics: relative L2 {err}");
    // Momentum buffers too (they are the averaged gradients of the first step, then some).
    let err = relative_l2(&t.dist_ckpt, &t.single_ckpt, |k| k.starts_with("optim."));
    assert!(err < 1e-4, "momentum: relative L2 {err}");

    // Epoch metrics are over all ranks: the same 48 training images, the whole val split.
    let line = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let (d, s) = (line(&t.dist_out), line(&t.single_out));
    let loss = |v: &serde_json::Value| v["train_loss"].as_f64().unwrap();
    assert!((loss(&d) - loss(&s)).abs() < 1e-3 * loss(&s), "{d} vs {s}");
    assert_eq!(d["val_top1"], s["val_top1"], "{d} vs {s}");
}

/// Segmentation over 2 ranks (the same engine as classification): each rank trains its slice of
/// every global batch with the pixel loss normalised over the global batch's labelled pixels,
/// synchronised BN, and ends like one process on the global batch; the evaluation's confusion
/// counts are summed over the ranks. (The head's dropout is off: its masks are drawn per rank.)
#[test]
fn segmentation_over_two_ranks_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    segmentation_folder(&data, 32, 6, 16, 16);
    let cfg = tmp.path().join("seg.toml");
    std::fs::write(
        &cfg,
        format!(
            "seed = 2\ntask = \"segmentation\"\n[model]\nname = \"cifar_resnet8\"\n[data]\ndir = {:?}\nworkers = 2\n\
             [train]\nepochs = 2\nbatch_size = 8\nthreads = 1\n[optim]\nlr = 0.02\n\
             [segment]\nnum_classes = 3\ncrop_size = 16\nscale = [0.75, 1.25]\ndropout = 0.0\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let t = two_ranks_and_one(
        tmp.path(),
        cfg.to_str().unwrap(),
        2,
        &[],
        &["distributed.sync_bn=true"],
    );
    assert!(
        t.log
            .contains("2 ranks over Gloo, batch 8 per rank = 16 global, batch norm synchronised"),
        "{}",
        t.log
    );
    assert_eq!(t.log.matches("epoch 2/2:").count(), 1, "{}", t.log);
    assert_eq!(relative_l2(&t.dist_ckpt, &t.r0, is_weight), 0.0);
    let err = relative_l2(&t.r0, &t.single_ckpt, is_weight);
    assert!(err < 1e-4, "2 ranks vs 1 process: relative L2 {err}");
    let err = relative_l2(&t.dist_ckpt, &t.single_ckpt, |k| k.starts_with("optim."));
    assert!(err < 1e-4, "momentum: relative L2 {err}");
    let lines = |dir: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (d, s) = (lines(&t.dist_out), lines(&t.single_out));
    assert_eq!(d.len(), 2);
    for (d, s) in d.iter().zip(&s) {
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        for k in ["train_loss", "train_pixel_acc", "val_loss"] {
            assert!(
                (f(d, k) - f(s, k)).abs() < 1e-3 * f(s, k).abs().max(1.0),
                "{k}: {d} vs {s}"
            );
        }
        for k in ["val_miou", "val_pixel_acc"] {
            assert!((f(d, k) - f(s, k)).abs() < 0.1, "{k}: {d} vs {s}");
        }
    }
}

/// airbench94's recipe (whitening init, lookahead, BN-bias lr, alternating flip, reflect
/// padding, label smoothing) over 2 ranks: rank 0 sets the whitening conv and the other rank
/// gets it, and lookahead's slow weights, by broadcast (without that broadcast the replicas
/// part at the first average); the ranks average at the same steps and end like one process on
/// the global batch, slow weights included.
/// Detection through the same path: 2 ranks of 8 images equal one process of 16. The samplers
/// draw per image from the image's place in the global batch and every image contributes the
/// same number of sampled anchors and proposals, so the ranks' mean losses average to the
/// global batch's; the evaluation gathers every rank's detections.
#[test]
fn detection_over_two_ranks_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    detection_folder(&data, 32, 4, 96, 80);
    let cfg = detection_config(tmp.path(), &data, 1, "");
    let t = two_ranks_and_one(tmp.path(), cfg.to_str().unwrap(), 1, &[], &[]);
    assert_eq!(t.log.matches("epoch 1/1:").count(), 1, "{}", t.log);
    assert_eq!(relative_l2(&t.dist_ckpt, &t.r0, is_weight), 0.0);
    let err = relative_l2(&t.r0, &t.single_ckpt, is_weight);
    assert!(err < 1e-4, "2 ranks vs 1 process: relative L2 {err}");
    let line = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let (d, s) = (line(&t.dist_out), line(&t.single_out));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    for k in [
        "train_loss",
        "train_loss_objectness",
        "train_loss_rpn_box_reg",
        "train_loss_classifier",
        "train_loss_box_reg",
    ] {
        assert!(
            (f(&d, k) - f(&s, k)).abs() < 1e-4 * f(&s, k).abs().max(1.0),
            "{k}: {d} vs {s}"
        );
    }
    assert!(
        (f(&d, "val_map") - f(&s, "val_map")).abs() < 0.5,
        "{d} vs {s}"
    );
}

#[test]
fn airbench94_recipe_over_two_ranks_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 4, 32);
    let cfg = airbench_config(tmp.path(), &data, 2, 2);
    let t = two_ranks_and_one(
        tmp.path(),
        cfg.to_str().unwrap(),
        2,
        &[],
        &["distributed.sync_bn=true"],
    );
    assert!(t.log.contains("whitening conv set"), "{}", t.log);
    assert_eq!(relative_l2(&t.dist_ckpt, &t.r0, is_weight), 0.0);
    let err = relative_l2(&t.r0, &t.single_ckpt, is_weight);
    assert!(err < 1e-4, "2 ranks vs 1 process: relative L2 {err}");
    let slow = |k: &str| k.starts_with("optim.lookahead.");
    assert!(t.dist_ckpt.keys().any(|k| slow(k)));
    let err = relative_l2(&t.dist_ckpt, &t.single_ckpt, slow);
    assert!(err < 1e-4, "lookahead's slow weights: relative L2 {err}");
}

fn rank(cfg: &str, out: &Path, rank: usize, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tricks"))
        .args(["train", "--config", cfg, "--out", out.to_str().unwrap()])
        .args(extra)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// kill -9 of one rank mid-training: the other stops with an error naming the failed
/// collective (instead of hanging), well before the 60 s timeout.
#[test]
fn a_killed_rank_makes_the_other_exit_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, 200, "");
    let cfg = cfg.to_str().unwrap();
    let out = tmp.path().join("run");
    let port = tricks::distributed::launch::free_port().unwrap();
    let extra = [
        "--set",
        "distributed.timeout_s=60",
        "--set",
        "train.batch_size=4",
    ];
    let mut r0 = rank(cfg, &out, 0, port, &extra);
    let mut r1 = rank(cfg, &out, 1, port, &extra);
    // Wait until training is under way (rank 0 writes epoch 1's metrics).
    let start = Instant::now();
    while !out.join("metrics.jsonl").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(50) {
            let _ = r0.kill();
            panic!("rank 0 still running 50 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("error: rank 0:"), "{err}");
    assert!(
        err.contains("another rank has probably stopped or died"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The launcher reports the first rank that failed and exits non-zero.
#[test]
fn launch_reports_a_failed_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "launch",
        "--nproc",
        "2",
        "--",
        "train",
        "--config",
        tmp.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("missing.toml"), "{err}");
    assert!(
        err.contains("launch: rank 0 failed (exit status 1)")
            || err.contains("launch: rank 1 failed (exit status 1)"),
        "{err}"
    );
}

/// SIGTERM to the launcher mid-run: every rank stops at the same step, rank 0 writes the
/// interrupt checkpoint, and `--resume` under a new launcher (only rank 0 reads the checkpoint;
/// the others get its state by broadcast) ends bit-identical to an uninterrupted run, metrics
/// included.
#[test]
fn an_interrupted_launch_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, 3, "");
    let cfg = cfg.to_str().unwrap();
    let launch = |out: &Path, weights: &Path, resume: bool| {
        let mut c = tricks();
        c.args(["launch", "--nproc", "2", "--", "train", "--config", cfg])
            .args([
                "--out",
                out.to_str().unwrap(),
                "--set",
                "train.batch_size=2",
            ])
            .env("TRICKS_DEBUG_RANK_WEIGHTS", weights)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if resume {
            c.arg("--resume");
        }
        c
    };
    let straight = tmp.path().join("straight");
    let o = launch(&straight, &tmp.path().join("w-straight"), false)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let run = tmp.path().join("run");
    let weights = tmp.path().join("w-run");
    let child = launch(&run, &weights, false).spawn().unwrap();
    let start = Instant::now();
    while !run.join("metrics.jsonl").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no epoch finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300)); // into epoch 2
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    // The ranks exit 143 after their checkpoint; the launcher, stopped by SIGTERM, too, and
    // does not call that a failed rank.
    let finished = run.join("summary.json").exists();
    assert_eq!(
        o.status.code(),
        Some(if finished { 0 } else { 143 }),
        "{err}"
    );
    assert!(!err.contains("failed"), "{err}");
    if finished {
        eprintln!("the run finished before the signal arrived; nothing to resume");
        return;
    }
    // Mid-epoch the ranks stop with an interrupt checkpoint; on a loaded machine the signal can
    // also land as an epoch ends, and the run stops after it with its epoch checkpoint. Either
    // way `--resume` must end bit-identical to the uninterrupted run.
    assert!(
        err.contains("interrupt.safetensors") || err.contains("stopped early after"),
        "{err}"
    );
    let o = launch(&run, &weights, true).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    for r in ["rank0", "rank1"] {
        let a = tensors(
            &tmp.path()
                .join("w-straight")
                .join(format!("{r}.safetensors")),
        );
        let b = tensors(&weights.join(format!("{r}.safetensors")));
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{r}: {k} differs after resume");
        }
    }
    let metrics = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (metrics(&straight), metrics(&run));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        for key in ["train_loss", "train_top1", "val_loss", "val_top1"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
}
