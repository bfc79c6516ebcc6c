//! The run folder: one training at a time (the lock), a refused command changes nothing, no
//! output inside the dataset, left-over temporary files, a broken `--out` link, resume across
//! loader settings, and the exit status of a run a signal stopped.

mod common;

use common::{image_folder, run, stderr, tiny_config, tricks};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};
use tricks::checkpoint;

/// A tiny dataset (`per_class` training images of 3 classes) and config in a temporary folder.
fn case(per_class: usize, epochs: usize) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, per_class, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, epochs, "");
    let cfg = cfg.to_str().unwrap().to_string();
    (tmp, data, cfg)
}

fn train(cfg: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", cfg, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn spawn_train(cfg: &str, out: &Path, extra: &[&str]) -> Child {
    tricks()
        .args(["train", "--config", cfg, "--out", out.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `child` holds the lock of `out` (its pid is in the lock file).
fn wait_for_lock(child: &Child, out: &Path) {
    let lock = out.join(tricks::engine::LOCK_FILE);
    let start = Instant::now();
    while std::fs::read_to_string(&lock)
        .ok()
        .map(|s| s.trim().to_string())
        != Some(child.id().to_string())
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the training did not lock {}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The files of `dir` and their contents, but for the lock file (whose content is the pid of
/// the last process that held it).
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file() && e.file_name() != tricks::engine::LOCK_FILE)
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_training_into_a_running_folder_is_refused_naming_the_holder() {
    let (tmp, _data, cfg) = case(200, 50);
    let out = tmp.path().join("run");
    let mut first = spawn_train(&cfg, &out, &[]);
    wait_for_lock(&first, &out);
    let o = train(&cfg, &out, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&out.display().to_string())
            && e.contains(&format!("process {}", first.id()))
            && e.contains("in use"),
        "{e}"
    );
    let o = train(&cfg, &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));

    // The lock dies with its holder: after kill -9 the lock file stays, and locks nothing.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(out.join(tricks::engine::LOCK_FILE).exists());
    let mut next = spawn_train(&cfg, &out, &["--resume"]);
    wait_for_lock(&next, &out);
    next.kill().unwrap();
    next.wait().unwrap();
}

#[test]
fn a_refused_resume_changes_nothing_on_disk_and_names_every_changed_key() {
    let (tmp, _data, cfg) = case(8, 1);
    let out = tmp.path().join("run");
    let o = train(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = (files_of(&out), files_of(&out.join("checkpoints")));

    let o = train(
        &cfg,
        &out,
        &[
            "--resume",
            "--set",
            "model.variant=\"d\"",
            "--set",
            "optim.lr=0.3",
            "--set",
            "seed=9",
        ],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    // One line holds the whole error.
    let e = e
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {e}"))
        .to_string();
    for part in [
        "config differs",
        "`model.variant`: \"a\" → \"d\"",
        "`optim.lr`: 0.05 → 0.3",
        "`seed`: 3 → 9",
        "from another run (its seed is 3, not 9)",
        "epoch-0001.safetensors",
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    assert_eq!(
        before,
        (files_of(&out), files_of(&out.join("checkpoints"))),
        "the refused resume changed the run folder"
    );

    // Without --resume, a folder holding a run's checkpoints is refused: config.toml stays.
    let o = train(&cfg, &out, &["--set", "optim.lr=0.3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("already holds checkpoints"));
    assert_eq!(before, (files_of(&out), files_of(&out.join("checkpoints"))));
}

#[test]
fn an_output_folder_inside_the_data_or_holding_it_is_refused_before_anything_is_written() {
    let (tmp, data, cfg) = case(8, 1);
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    let train_before = listing(&data.join("train"));
    for out in [data.join("train"), data.join("train").join("new")] {
        let o = train(&cfg, &out, &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(
            e.contains("inside the data folder")
                && e.contains(&out.display().to_string())
                && e.contains(&data.display().to_string()),
            "{e}"
        );
        assert_eq!(listing(&data.join("train")), train_before, "{e}");
    }
    // The other way round: the data folder inside --out.
    let tmp_before = listing(tmp.path());
    let o = train(&cfg, tmp.path(), &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("is inside the output folder") && e.contains(&data.display().to_string()),
        "{e}"
    );
    assert_eq!(listing(tmp.path()), tmp_before);

    // Segmentation data (images/ and masks/ under data.dir) the same way.
    let seg = tmp.path().join("seg");
    common::segmentation_folder(&seg, 4, 2, 16, 16);
    let seg_cfg = tmp.path().join("seg.toml");
    std::fs::write(
        &seg_cfg,
        format!(
            "seed = 1\ntask = \"segmentation\"\n[model]\nname = \"cifar_resnet8\"\n[data]\ndir = {:?}\nworkers = 1\n\
             [train]\nepochs = 1\nbatch_size = 2\nthreads = 1\n[segment]\nnum_classes = 3\ncrop_size = 16\n",
            seg.display().to_string()
        ),
    )
    .unwrap();
    let masks = seg.join("val").join("masks");
    let masks_before = listing(&masks);
    let o = train(seg_cfg.to_str().unwrap(), &masks.join("run"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("inside the data folder"),
        "{}",
        stderr(&o)
    );
    assert_eq!(listing(&masks), masks_before);
}

#[test]
fn a_broken_symlink_as_out_says_where_it_points() {
    let (tmp, _data, cfg) = case(8, 1);
    let out = tmp.path().join("out");
    let target = tmp.path().join("gone").join("deeper");
    std::os::unix::fs::symlink(&target, &out).unwrap();
    let o = train(&cfg, &out, &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("broken symbolic link")
            && e.contains(&target.display().to_string())
            && !e.contains("os error 17"),
        "{e}"
    );
    // A folder under the broken link: the link is named the same way.
    let o = train(&cfg, &out.join("sub"), &[]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("broken symbolic link") && e.contains(&target.display().to_string()),
        "{e}"
    );
}

#[test]
fn temporary_files_of_dead_writers_are_removed_when_a_run_resumes() {
    let (tmp, _data, cfg) = case(8, 1);
    let out = tmp.path().join("run");
    let o = train(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let ckpts = out.join("checkpoints");
    let stale = [
        ckpts.join(format!(".epoch-0002.safetensors.tmp-{dead}")),
        out.join(format!(".summary.json.tmp-{dead}")),
    ];
    // A writer that still runs (this test) keeps its file.
    let live = ckpts.join(format!(
        ".epoch-0003.safetensors.tmp-{}",
        std::process::id()
    ));
    for p in stale.iter().chain([&live]) {
        std::fs::write(p, b"half a checkpoint").unwrap();
    }
    let o = train(&cfg, &out, &["--resume"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    for p in &stale {
        assert!(!p.exists(), "{} was left: {e}", p.display());
    }
    assert!(live.exists());
    assert!(e.contains(&format!("left by process {dead}")), "{e}");
}

#[test]
fn resume_accepts_changed_loader_settings_and_warns_on_threads() {
    let (tmp, _data, cfg) = case(8, 1);
    let out = tmp.path().join("run");
    let o = train(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(
        &cfg,
        &out,
        &[
            "--resume",
            "--set",
            "data.workers=1",
            "--set",
            "data.prefetch=5",
            "--set",
            "data.pin_memory=false",
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    // No warning about the changed settings (the tiny config's own schedule warning aside).
    let about_change = [
        "data.workers",
        "data.prefetch",
        "data.pin_memory",
        "bit-identical",
    ];
    assert!(
        e.contains("resuming from") && !about_change.iter().any(|k| e.contains(k)),
        "{e}"
    );

    let o = train(&cfg, &out, &["--resume", "--set", "train.threads=2"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("resuming from")
            && e.contains("warning: key `train.threads` changed from 1 to 2")
            && e.contains("no longer bit-identical"),
        "{e}"
    );
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("threads = 2"), "{saved}");
}

/// Sends SIGINT to `child` `settle` after its run in `out` started (its config.toml written).
fn sigint_once_training(child: &Child, out: &Path, settle: Duration) {
    let start = Instant::now();
    while !out.join("config.toml").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(settle); // into epoch 1
                                // SAFETY: a signal to a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
}

#[test]
fn sigint_ends_a_run_with_status_130_after_its_checkpoint() {
    let (tmp, _data, cfg) = case(200, 2);
    let out = tmp.path().join("run");
    let child = spawn_train(&cfg, &out, &[]);
    sigint_once_training(&child, &out, Duration::from_millis(200));
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    if out.join("summary.json").exists() {
        assert_eq!(o.status.code(), Some(0), "{e}");
        eprintln!("note: the run finished before SIGINT arrived; the stop path not exercised");
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{e}");
    let ckpts = out.join("checkpoints");
    assert!(
        ckpts.join(checkpoint::INTERRUPT_FILE).exists()
            || !checkpoint::list_epoch_checkpoints(&ckpts).is_empty(),
        "{e}"
    );
}

/// SIGINT to `tricks launch`: it forwards SIGTERM, the ranks write the interrupt checkpoint and
/// exit 143, which the launcher does not call a failure; it exits 130 (its own signal).
#[test]
fn an_interrupted_launch_exits_130_without_reporting_a_failed_rank() {
    let (tmp, _data, cfg) = case(200, 2);
    let out = tmp.path().join("run");
    let child = tricks()
        .args(["launch", "--nproc", "2", "--", "train", "--config", &cfg])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sigint_once_training(&child, &out, Duration::from_millis(300));
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    assert!(!e.contains("failed"), "{e}");
    if out.join("summary.json").exists() {
        assert_eq!(o.status.code(), Some(0), "{e}");
        eprintln!("note: the run finished before SIGINT arrived; the stop path not exercised");
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{e}");
    let ckpts = out.join("checkpoints");
    assert!(
        ckpts.join(checkpoint::INTERRUPT_FILE).exists()
            || !checkpoint::list_epoch_checkpoints(&ckpts).is_empty(),
        "{e}"
    );
}
