//! `tricks ablate` / `tricks report` end to end on a tiny generated ImageFolder dataset
//! (3 classes, 16x16 PNGs) with a CIFAR ResNet-8: every output exists, the table's statistics are
//! those of the runs on disk, a second call skips finished runs, failures are reported without
//! stopping the study, and a bad override key fails before any training starts.

use std::path::{Path, PathBuf};

use tricks::classify::RunSummary;
use tricks::experiments::{self, RunStatus, Study};

const PLOTS: [&str; 4] = ["val_top1", "train_loss", "lr_schedule", "delta_top1"];

/// `root/{train,val}/{a,b,c}/N.png`: three classes of noisy 16x16 images that differ only by a
/// faint tint, so that accuracies differ between seeds (the statistics below are not all-100 %).
fn make_dataset(root: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 200) as u8
    };
    for (split, per_class) in [("train", 8u32), ("val", 4u32)] {
        for (k, class) in ["a", "b", "c"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let img = image::RgbImage::from_fn(16, 16, |_, _| {
                    let mut p = [noise(), noise(), noise()];
                    p[k] = p[k].saturating_add(12);
                    image::Rgb(p)
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn base_config(data: &Path) -> String {
    format!(
        r#"
[model]
name = "cifar_resnet8"

[data]
dir = {data:?}
pipeline = "cifar"
train_size = 16
val_size = 16
val_crop_ratio = 1.0
cifar_pad = 2
workers = 1

[train]
epochs = 2
batch_size = 4
keep_checkpoints = 1

[optim]
lr = 0.05
step_epochs = [1]
"#,
        data = data.display().to_string()
    )
}

/// A temp folder with the dataset and `base.toml` (kept, and its path printed, when
/// `TRICKS_KEEP_TEST_OUTPUT` is set: handy to look at the plots).
fn setup() -> (tempfile::TempDir, PathBuf) {
    let mut tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("TRICKS_KEEP_TEST_OUTPUT").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("test output kept in {}", tmp.path().display());
    }
    let data = tmp.path().join("data");
    make_dataset(&data);
    std::fs::write(tmp.path().join("base.toml"), base_config(&data)).unwrap();
    (tmp, data)
}

fn write_study(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn summary(run: &Path) -> RunSummary {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Mean and sample std (n - 1), computed here independently of the crate.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

/// The cells of the table row of a variant.
fn table_row(table: &str, variant: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {variant} |")))
        .unwrap_or_else(|| panic!("no row for {variant} in\n{table}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn ablate_writes_table_csv_plots_and_skips_finished_runs() {
    let (tmp, _) = setup();
    let study = write_study(
        tmp.path(),
        "study.toml",
        r#"
base = "base.toml"
mode = "cumulative"
seeds = [1, 2]
[[variants]]
name = "baseline"
[[variants]]
name = "cosine"
overrides = { "optim.schedule" = "cosine" }
"#,
    );
    let out = tmp.path().join("out");
    let rep = experiments::ablate(&study, &out, 2, tch::Device::Cpu, false).unwrap();
    assert_eq!(rep.trained, 4, "{rep:?}");
    assert_eq!(rep.skipped, 0);
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert!(!rep.interrupted);

    for f in [
        "results.csv",
        "table.md",
        "study.toml",
        "study.json",
        "configs/baseline.toml",
        "configs/cosine.toml",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    for p in PLOTS {
        for ext in ["png", "svg"] {
            let path = out.join(format!("{p}.{ext}"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(bytes.len() > 1000, "{} is nearly empty", path.display());
            if ext == "png" {
                assert_eq!(&bytes[..4], b"\x89PNG", "{}", path.display());
            } else {
                assert!(
                    String::from_utf8_lossy(&bytes).contains("<svg"),
                    "{}",
                    path.display()
                );
            }
        }
    }
    let cosine_cfg = std::fs::read_to_string(out.join("runs/cosine/seed-2/config.toml")).unwrap();
    assert!(cosine_cfg.contains("schedule = \"cosine\""), "{cosine_cfg}");
    assert!(cosine_cfg.contains("seed = 2"), "{cosine_cfg}");

    // The table's statistics are those of the runs' summary.json files.
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        table.contains("2 seeds (1, 2)") && table.contains("mode: cumulative"),
        "{table}"
    );
    let mut means = Vec::new();
    for variant in ["baseline", "cosine"] {
        let runs: Vec<RunSummary> = [1, 2]
            .iter()
            .map(|s| summary(&out.join(format!("runs/{variant}/seed-{s}"))))
            .collect();
        for (s, r) in [1, 2].iter().zip(&runs) {
            // summary.json's final top-1 is the last epoch's validation top-1 in metrics.jsonl.
            let metrics =
                std::fs::read_to_string(out.join(format!("runs/{variant}/seed-{s}/metrics.jsonl")))
                    .unwrap();
            let last: tricks::classify::EpochMetrics =
                serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
            assert_eq!(last.epoch, 2);
            assert_eq!(last.val_top1, Some(r.final_top1));
        }
        let (m1, s1) = mean_std(&runs.iter().map(|r| r.final_top1).collect::<Vec<_>>());
        let (m5, _) = mean_std(&runs.iter().map(|r| r.final_top5).collect::<Vec<_>>());
        let row = table_row(&table, variant);
        assert_eq!(row[1], format!("{m1:.2} ± {s1:.2}"), "{table}");
        assert_eq!(row[2], format!("{m5:.2}"), "{table}");
        assert_eq!(row[5], "2/2");
        means.push(m1);
    }
    assert_eq!(
        table_row(&table, "cosine")[3],
        format!("{:+.2}", means[1] - means[0])
    );
    // Δ against the row above (cumulative), paired by seed: the table's interval and verdict and
    // study.json's statistics are those of the per-seed differences.
    let top1 = |v: &str| -> Vec<f64> {
        [1, 2]
            .iter()
            .map(|s| summary(&out.join(format!("runs/{v}/seed-{s}"))).final_top1)
            .collect()
    };
    let (cos, base) = (top1("cosine"), top1("baseline"));
    let row = table_row(&table, "cosine");
    match tricks::experiments::stats::paired(&cos, &base) {
        Some(d) => {
            assert_eq!(row[7], format!("{:+.2} ± {:.2}", d.delta, d.half_width));
            assert_eq!(row[8], d.verdict.as_str());
        }
        None => assert_eq!(row[8], "too few runs"),
    }
    assert_eq!(table_row(&table, "baseline")[8], "reference");
    let ci = tricks::experiments::stats::mean_ci(&cos).unwrap();
    let h = ci.half_width.unwrap();
    assert_eq!(row[6], format!("{:.2} – {:.2}", ci.mean - h, ci.mean + h));
    let study_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("study.json")).unwrap()).unwrap();
    let stats = study_json["statistics"].as_array().unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[1]["name"], "cosine");
    assert!((stats[1]["delta"].as_f64().unwrap() - (means[1] - means[0])).abs() < 1e-9);

    // results.csv: a header and one `done` line per run with the summary's numbers.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "variant,seed,top1,top5,best_top1,best_epoch,train_seconds,images_per_second,status"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    for l in &lines[1..] {
        let cells: Vec<&str> = l.split(',').collect();
        assert_eq!(cells[8], "done", "{l}");
        let s = summary(&out.join(format!("runs/{}/seed-{}", cells[0], cells[1])));
        assert!(
            (cells[2].parse::<f64>().unwrap() - s.final_top1).abs() < 1e-3,
            "{l}"
        );
        assert_eq!(cells[5], s.best_epoch.to_string());
    }

    // A second call trains nothing and leaves every finished run untouched.
    let stamp = |v: &str, s: u64| {
        std::fs::metadata(out.join(format!("runs/{v}/seed-{s}/summary.json")))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = ["baseline", "cosine"]
        .iter()
        .flat_map(|v| [1, 2].map(|s| stamp(v, s)))
        .collect();
    let rep2 = experiments::ablate(&study, &out, 1, tch::Device::Cpu, false).unwrap();
    assert_eq!((rep2.trained, rep2.skipped), (0, 4), "{rep2:?}");
    let after: Vec<_> = ["baseline", "cosine"]
        .iter()
        .flat_map(|v| [1, 2].map(|s| stamp(v, s)))
        .collect();
    assert_eq!(before, after);
    assert!(rep2.runs.iter().all(|r| r.status == RunStatus::Done));

    // `report` regenerates the outputs from the runs on disk.
    for p in PLOTS {
        std::fs::remove_file(out.join(format!("{p}.png"))).unwrap();
    }
    std::fs::remove_file(out.join("table.md")).unwrap();
    experiments::report(&out).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("table.md")).unwrap(),
        table
    );
    for p in PLOTS {
        assert!(
            std::fs::metadata(out.join(format!("{p}.png")))
                .unwrap()
                .len()
                > 1000
        );
    }

    // A changed study does not silently reuse runs trained with another config.
    let changed = write_study(
        tmp.path(),
        "changed.toml",
        &std::fs::read_to_string(&study)
            .unwrap()
            .replace("\"cosine\" }", "\"cosine\", \"optim.lr\" = 0.2 }"),
    );
    let e = format!(
        "{:#}",
        experiments::ablate(&changed, &out, 1, tch::Device::Cpu, false).unwrap_err()
    );
    assert!(e.contains("optim.lr") && e.contains("cosine"), "{e}");
}

#[test]
fn a_failed_run_is_reported_and_the_study_goes_on() {
    let (tmp, _) = setup();
    let study = write_study(
        tmp.path(),
        "study.toml",
        r#"
base = "base.toml"
mode = "independent"
seeds = [7]
epochs = 1
[[variants]]
name = "baseline"
[[variants]]
name = "huge batch"
overrides = { "train.batch_size" = 1000 }
"#,
    );
    let out = tmp.path().join("out");
    let rep = experiments::ablate(&study, &out, 1, tch::Device::Cpu, false).unwrap();
    assert_eq!(rep.trained, 1);
    assert_eq!(rep.failed.len(), 1, "{rep:?}");
    assert_eq!(rep.failed[0].0, "huge batch");
    let error = std::fs::read_to_string(out.join("runs/huge-batch/seed-7/error.txt")).unwrap();
    assert!(error.contains("train.batch_size"), "{error}");
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        table.contains("## Failed runs") && table.contains("train.batch_size"),
        "{table}"
    );
    assert_eq!(
        table_row(&table, "baseline")[1].split(' ').nth(1),
        Some("±")
    );
    assert!(
        table_row(&table, "baseline")[1].ends_with("± 0"),
        "one seed: {table}"
    );
    assert_eq!(table_row(&table, "huge batch")[5], "0/1");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.contains("huge batch,7,,,,,,,failed"), "{csv}");
    for p in PLOTS {
        assert!(out.join(format!("{p}.svg")).is_file());
    }
}

#[test]
fn a_bad_override_fails_before_any_training() {
    let (tmp, _) = setup();
    let study = write_study(
        tmp.path(),
        "study.toml",
        r#"
base = "base.toml"
mode = "cumulative"
seeds = [1]
[[variants]]
name = "baseline"
[[variants]]
name = "cosine"
overrides = { "optim.schedule" = "cosine" }
[[variants]]
name = "typo"
overrides = { "loss.label_smothing" = 0.1 }
"#,
    );
    let out = tmp.path().join("out");
    let e = format!(
        "{:#}",
        experiments::ablate(&study, &out, 1, tch::Device::Cpu, false).unwrap_err()
    );
    assert!(
        e.contains("variant 3") && e.contains("typo") && e.contains("label_smothing"),
        "{e}"
    );
    assert!(
        !out.join("runs").exists(),
        "a run started before the study was validated"
    );

    // A bad value is caught the same way, and so is an unknown study key.
    let bad_value = write_study(
        tmp.path(),
        "bad_value.toml",
        "base = \"base.toml\"\n[[variants]]\nname = \"a\"\n[[variants]]\nname = \"b\"\noverrides = { \"optim.schedule\" = \"cosin\" }\n",
    );
    let e = format!(
        "{:#}",
        experiments::ablate(&bad_value, &out, 1, tch::Device::Cpu, false).unwrap_err()
    );
    assert!(
        e.contains("variant 2") && e.contains("optim.schedule"),
        "{e}"
    );
    let unknown = write_study(
        tmp.path(),
        "unknown.toml",
        "base = \"base.toml\"\nsedes = [1]\n[[variants]]\nname = \"a\"\n",
    );
    let e = format!(
        "{:#}",
        experiments::ablate(&unknown, &out, 1, tch::Device::Cpu, false).unwrap_err()
    );
    assert!(e.contains("sedes"), "{e}");
    assert!(!out.join("runs").exists());
}

#[test]
fn study_files_resolve_as_documented() {
    let (tmp, data) = setup();
    // The minimal study of the docs, with `base` relative to the study file's folder.
    let sub = tmp.path().join("studies");
    std::fs::create_dir_all(&sub).unwrap();
    let minimal = format!(
        r#"
base = "../base.toml"   # a config file
mode = "independent"
seeds = [1, 2]
data = {data:?}
epochs = 1
[[variants]]
name = "baseline"
[[variants]]
name = "cosine"
overrides = {{ "optim.schedule" = "cosine" }}
"#,
        data = data.display().to_string()
    );
    let s = Study::load(&write_study(&sub, "minimal.toml", &minimal)).unwrap();
    assert_eq!(s.seeds, vec![1, 2]);
    assert_eq!(s.variants.len(), 2);
    for v in &s.variants {
        assert_eq!(v.config.train.epochs, 1);
        assert_eq!(v.config.data.dir, data.display().to_string());
        assert_eq!(v.config.model.name, "cifar_resnet8");
    }
    assert_eq!(
        s.variants[0].config.optim.schedule,
        tricks::config::Schedule::Step
    );
    assert_eq!(
        s.variants[1].config.optim.schedule,
        tricks::config::Schedule::Cosine
    );
    let cfg = s.run_config(1, 2, 3);
    assert_eq!((cfg.seed, cfg.train.threads), (2, 3));

    // A missing base config names both places it was looked for.
    let e = format!(
        "{:#}",
        Study::load(&write_study(
            &sub,
            "nobase.toml",
            "base = \"nope.toml\"\n[[variants]]\nname = \"a\"\n"
        ))
        .unwrap_err()
    );
    assert!(
        e.contains("nope.toml")
            && e.contains("study file's folder")
            && e.contains("current folder"),
        "{e}"
    );

    // An inline base config, top-level overrides, the default seeds and cumulative mode.
    let inline = format!(
        r#"
mode = "cumulative"
device = "cpu"
overrides = {{ "data.train_limit" = 8, "train.threads" = 1 }}
[base_config]
model = {{ name = "cifar_resnet8" }}
data = {{ dir = {data:?}, pipeline = "cifar", train_size = 16, val_size = 16 }}
[[variants]]
name = "+cosine"
overrides = {{ optim.schedule = "cosine" }}
[[variants]]
name = "+label smoothing"
overrides = {{ "loss.label_smoothing" = 0.1 }}
"#,
        data = data.display().to_string()
    );
    let s = Study::load(&write_study(&sub, "inline.toml", &inline)).unwrap();
    assert_eq!(s.seeds, vec![1, 2, 3]);
    assert_eq!(s.device.as_deref(), Some("cpu"));
    let last = &s.variants[1];
    assert_eq!(last.dir, "+label-smoothing");
    assert_eq!(last.config.optim.schedule, tricks::config::Schedule::Cosine);
    assert_eq!(last.config.loss.label_smoothing, 0.1);
    assert_eq!(last.config.data.train_limit, 8);
    // The study sets train.threads, so --jobs does not change it.
    assert_eq!(s.run_config(1, 1, 4).train.threads, 1);
}

#[test]
fn every_shipped_study_parses() {
    // Integration tests run in the package root, where `studies/` and `configs/` live.
    let mut n = 0;
    for dir in ["studies", "studies/paper"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Study::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                assert!(!s.variants.is_empty());
                n += 1;
            }
        }
    }
    assert!(n >= 12, "expected the 12 shipped studies, found {n}");
}

/// Runs a study on real data with the library (for a look before the CLI has `ablate`):
/// `TRICKS_STUDY=studies/quick.toml TRICKS_STUDY_OUT=runs/quick cargo test --release --test ablate -- --ignored`
#[test]
#[ignore]
fn run_study_from_env() {
    let (Some(study), Some(out)) = (
        std::env::var_os("TRICKS_STUDY"),
        std::env::var_os("TRICKS_STUDY_OUT"),
    ) else {
        panic!("set TRICKS_STUDY and TRICKS_STUDY_OUT");
    };
    let jobs = std::env::var("TRICKS_STUDY_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(1);
    let rep = experiments::ablate(
        Path::new(&study),
        Path::new(&out),
        jobs,
        tch::Device::Cpu,
        false,
    )
    .unwrap();
    eprintln!("{}", rep.summary_line());
}

/// `root/{train,val}/{images,masks}`: blocky 16x16 images whose colour is the class (0..2).
fn make_segmentation_dataset(root: &Path) {
    const COLOURS: [[u8; 3]; 3] = [[220, 30, 30], [30, 220, 30], [30, 30, 220]];
    for (split, n) in [("train", 4u32), ("val", 2u32)] {
        std::fs::create_dir_all(root.join(split).join("images")).unwrap();
        std::fs::create_dir_all(root.join(split).join("masks")).unwrap();
        for i in 0..n {
            let class = |x: u32, y: u32| ((x / 4) * 7 + (y / 4) * 3 + i) % 3;
            let img =
                image::RgbImage::from_fn(16, 16, |x, y| image::Rgb(COLOURS[class(x, y) as usize]));
            let mask = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([class(x, y) as u8]));
            img.save(root.join(split).join("images").join(format!("{i}.png")))
                .unwrap();
            mask.save(root.join(split).join("masks").join(format!("{i}.png")))
                .unwrap();
        }
    }
}

#[test]
fn a_segmentation_study_reports_miou() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("seg");
    make_segmentation_dataset(&data);
    let study = write_study(
        tmp.path(),
        "seg.toml",
        &format!(
            r#"
mode = "independent"
seeds = [1]
[base_config]
task = "segmentation"
model = {{ name = "cifar_resnet8" }}
data = {{ dir = {data:?}, workers = 1 }}
train = {{ epochs = 1, batch_size = 2 }}
optim = {{ lr = 0.05 }}
segment = {{ num_classes = 3, crop_size = 16 }}
[[variants]]
name = "step"
[[variants]]
name = "cosine"
overrides = {{ "optim.schedule" = "cosine" }}
"#,
            data = data.display().to_string()
        ),
    );
    let out = tmp.path().join("out");
    let rep = experiments::ablate(&study, &out, 1, tch::Device::Cpu, false).unwrap();
    assert_eq!(rep.trained, 2, "{:?}", rep.failed);
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        table.contains("| Variant | mIoU (%) | Pixel acc. (%) | Δ mIoU |"),
        "{table}"
    );
    let s: tricks::segment::SegSummary = serde_json::from_str(
        &std::fs::read_to_string(out.join("runs/cosine/seed-1/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        table_row(&table, "cosine")[1],
        format!("{:.2} ± 0", s.final_miou)
    );
    // The CSV and the plots name the metrics as what they are.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(
        csv.starts_with("variant,seed,miou,pixel_acc,best_miou,best_epoch,"),
        "{csv}"
    );
    for p in PLOTS.map(|p| p.replace("top1", "miou")) {
        assert!(out.join(format!("{p}.png")).is_file(), "{p}");
    }
}
