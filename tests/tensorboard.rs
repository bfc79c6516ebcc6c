//! TensorBoard event files (`<run>/tb/`), read back with the `tensorboard` package's own reader
//! (`EventAccumulator`, and its raw loader to count every event of every file): the per-epoch
//! scalars equal `metrics.jsonl`'s (at f32 precision) at step = epoch, the per-step training loss
//! and lr (`train.log_every`) come at the global steps, and a run stopped mid-way and resumed
//! writes each epoch and each step once.
//!
//! Without python or tensorboard the test prints why and passes, unless
//! `TRICKS_REQUIRE_PARITY=1` (as `make test` sets), which makes that a failure.
//! `scripts/setup.sh --with-timm` installs it.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const READ_EVENTS: &str = r#"
import json, os, sys, collections
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
except ImportError as e:
    print("missing:", e); sys.exit(3)
d = sys.argv[1]
acc = EventAccumulator(d, size_guidance={"scalars": 0})
acc.Reload()
scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
raw = collections.Counter()
files = sorted(f for f in os.listdir(d) if f.startswith("events.out.tfevents."))
versions = []
for f in files:
    for i, ev in enumerate(LegacyEventFileLoader(os.path.join(d, f)).Load()):
        if i == 0:
            versions.append(ev.file_version)
        for v in ev.summary.value:
            raw["%s@%d" % (v.tag, ev.step)] += 1
print(json.dumps({"scalars": scalars, "raw": raw, "files": len(files), "versions": versions}))
"#;

/// The events of `<out>/tb` as tensorboard reads them; `None` (after [`skip`]) without python or
/// the package.
fn read_events(out: &Path) -> Option<Value> {
    let o = match Command::new(python())
        .args(["-c", READ_EVENTS])
        .arg(out.join("tb"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            skip_reference(
                "tensorboard",
                &format!("cannot run {}: {e}", python().display()),
            );
            return None;
        }
    };
    if o.status.code() == Some(3) {
        skip_reference("tensorboard", String::from_utf8_lossy(&o.stdout).trim());
        return None;
    }
    assert!(
        o.status.success(),
        "reading the events failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

/// A tag's (step, value) points.
fn points(events: &Value, tag: &str) -> Vec<(u64, f32)> {
    events["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no tag {tag}: {}", events["scalars"]))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect()
}

/// Every numeric field of every metrics line is a scalar at step = epoch with the same value
/// (f32); `epochs` lines in all.
fn check_epoch_scalars(out: &Path, events: &Value, epochs: u64) {
    let lines: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, epochs);
    let mut expected: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for line in &lines {
        let epoch = line["epoch"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            let Some(x) = v.as_f64() else { continue };
            if k == "epoch" {
                continue;
            }
            let tag = match (k.strip_prefix("train_"), k.strip_prefix("val_")) {
                (Some(r), _) => format!("train/{r}"),
                (_, Some(r)) => format!("val/{r}"),
                _ => k.clone(),
            };
            expected.entry(tag).or_default().push((epoch, x as f32));
        }
    }
    for tag in ["train/loss", "train/top1", "val/loss", "val/top1", "lr"] {
        assert!(expected.contains_key(tag), "metrics.jsonl lacks {tag}");
    }
    for (tag, want) in &expected {
        assert_eq!(&points(events, tag), want, "tag {tag}");
    }
}

/// Trains with the per-step points on (`train.log_every = 1`).
fn train(config: &Path, out: &Path, extra: &[&str]) {
    common::train(
        config,
        out,
        &[&["--set", "train.log_every=1"], extra].concat(),
    );
}

#[test]
fn events_match_metrics_and_a_resumed_run_writes_each_step_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 2, 8, 4, 12);
    // 16 training images, batch 8: 2 steps an epoch, 3 epochs.
    let cfg = tiny_config(tmp.path(), &data, 3, "");

    let full = tmp.path().join("full");
    train(&cfg, &full, &[]);
    let Some(events) = read_events(&full) else {
        return;
    };
    assert_eq!(events["files"], 1);
    assert_eq!(events["versions"][0], "brain.Event:2");
    check_epoch_scalars(&full, &events, 3);
    let steps: Vec<u64> = (1..=6).collect();
    let loss = points(&events, "train_step/loss");
    let lr = points(&events, "train_step/lr");
    assert_eq!(loss.iter().map(|p| p.0).collect::<Vec<_>>(), steps);
    assert_eq!(lr.iter().map(|p| p.0).collect::<Vec<_>>(), steps);
    // Two equal batches an epoch: the epoch's loss is the mean of its two steps'.
    for (e, (_, epoch_loss)) in points(&events, "train/loss").into_iter().enumerate() {
        let mean = (loss[2 * e].1 + loss[2 * e + 1].1) / 2.0;
        assert!(
            (mean - epoch_loss).abs() <= 1e-5 * epoch_loss.abs().max(1.0),
            "epoch {}: steps' mean {mean}, epoch {epoch_loss}",
            e + 1
        );
    }
    // The lr at an epoch's last step is the epoch's lr.
    for (e, (_, epoch_lr)) in points(&events, "lr").into_iter().enumerate() {
        assert_eq!(lr[2 * e + 1].1, epoch_lr);
    }

    // Stopped after 3 steps (mid-way through epoch 2), then resumed to the end.
    let resumed = tmp.path().join("resumed");
    train(&cfg, &resumed, &["--set", "train.max_steps=3"]);
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
        "--set",
        "train.log_every=1",
        "--resume",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    let events = read_events(&resumed).unwrap();
    assert_eq!(events["files"], 2, "a resumed run appends a new event file");
    let raw = events["raw"].as_object().unwrap();
    let twice: Vec<&String> = raw.iter().filter(|(_, n)| *n != 1).map(|e| e.0).collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    check_epoch_scalars(&resumed, &events, 3);
    for tag in ["train_step/loss", "train_step/lr"] {
        let got: Vec<u64> = points(&events, tag).iter().map(|p| p.0).collect();
        assert_eq!(got, steps, "{tag}");
    }
}
