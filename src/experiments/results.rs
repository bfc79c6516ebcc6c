//! The results of a study as they lie on disk (`<out>/runs/<variant>/seed-<s>/`), their
//! statistics over seeds, and the `results.csv` / `table.md` written from them.

use super::stats::{self, Delta};
use super::study::{Manifest, Mode};
use crate::classify::{EpochMetrics, RunSummary};
use crate::config::Task;
use crate::detect::{DetEpochMetrics, DetSummary};
use crate::segment::{SegEpochMetrics, SegSummary};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// `summary.json` exists: the run finished.
    Done,
    /// The run stopped with an error (kept in `error.txt`).
    Failed,
    /// Started but not finished (interrupted, or still running elsewhere).
    Incomplete,
    /// Not started.
    Pending,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Done => "done",
            RunStatus::Failed => "failed",
            RunStatus::Incomplete => "incomplete",
            RunStatus::Pending => "pending",
        }
    }
}

/// A finished run's figures whatever its task, adapted from the task's own `summary.json`: the
/// headline metric (top-1, mIoU) and the second one (top-5, pixel accuracy), in %.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunOutcome {
    pub epochs: usize,
    pub final_metric: f64,
    pub final_second: f64,
    pub best_metric: f64,
    pub best_epoch: usize,
    pub final_val_loss: Option<f64>,
    pub train_seconds: f64,
    pub images_per_second: f64,
    pub stopped_early: bool,
}

impl From<&RunSummary> for RunOutcome {
    fn from(s: &RunSummary) -> RunOutcome {
        RunOutcome {
            epochs: s.epochs,
            final_metric: s.final_top1,
            final_second: s.final_top5,
            best_metric: s.best_top1,
            best_epoch: s.best_epoch,
            final_val_loss: s.final_val_loss,
            train_seconds: s.train_seconds,
            images_per_second: s.images_per_second,
            stopped_early: s.stopped_early,
        }
    }
}

impl From<&DetSummary> for RunOutcome {
    fn from(s: &DetSummary) -> RunOutcome {
        RunOutcome {
            epochs: s.epochs,
            final_metric: s.final_map,
            final_second: s.final_ap50,
            best_metric: s.best_map,
            best_epoch: s.best_epoch,
            final_val_loss: s.final_val_loss,
            train_seconds: s.train_seconds,
            images_per_second: s.images_per_second,
            stopped_early: s.stopped_early,
        }
    }
}

impl From<DetEpochMetrics> for EpochPoint {
    fn from(m: DetEpochMetrics) -> EpochPoint {
        EpochPoint {
            epoch: m.epoch,
            lr: m.lr,
            train_loss: m.train_loss,
            val_metric: m.val_map,
        }
    }
}

impl From<&SegSummary> for RunOutcome {
    fn from(s: &SegSummary) -> RunOutcome {
        RunOutcome {
            epochs: s.epochs,
            final_metric: s.final_miou,
            final_second: s.final_pixel_acc,
            best_metric: s.best_miou,
            best_epoch: s.best_epoch,
            final_val_loss: s.final_val_loss,
            train_seconds: s.train_seconds,
            images_per_second: s.images_per_second,
            stopped_early: s.stopped_early,
        }
    }
}

/// One epoch of a run whatever its task: what the plots draw.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    /// The validation headline metric (%), on epochs that were evaluated.
    pub val_metric: Option<f64>,
}

impl From<EpochMetrics> for EpochPoint {
    fn from(m: EpochMetrics) -> EpochPoint {
        EpochPoint {
            epoch: m.epoch,
            lr: m.lr,
            train_loss: m.train_loss,
            val_metric: m.val_top1,
        }
    }
}

impl From<SegEpochMetrics> for EpochPoint {
    fn from(m: SegEpochMetrics) -> EpochPoint {
        EpochPoint {
            epoch: m.epoch,
            lr: m.lr,
            train_loss: m.train_loss,
            val_metric: m.val_miou,
        }
    }
}

/// One (variant, seed) run.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub variant: String,
    pub seed: u64,
    pub dir: PathBuf,
    pub status: RunStatus,
    pub summary: Option<RunOutcome>,
    /// The error of a failed run.
    pub error: Option<String>,
    /// Per-epoch metrics (empty when the run never finished an epoch).
    #[serde(skip)]
    pub metrics: Vec<EpochPoint>,
}

/// One row of the table: a variant's statistics over its finished runs.
#[derive(Debug, Clone, Serialize)]
pub struct VariantRow {
    pub name: String,
    /// Finished runs (the statistics are over these).
    pub n: usize,
    /// Runs the study asked for.
    pub runs: usize,
    /// Mean and sample standard deviation (n - 1; 0 with one run) of the final headline metric
    /// (top-1, mIoU; %).
    pub metric_mean: Option<f64>,
    pub metric_std: Option<f64>,
    /// Mean of the final second metric (top-5, pixel accuracy; %).
    pub second_mean: Option<f64>,
    /// 95 % confidence interval of the mean headline metric: mean ± this (Student t; none
    /// with one run).
    pub metric_ci: Option<f64>,
    /// Mean headline metric minus the reference row's (the first row in independent mode, the
    /// row above in cumulative mode; percentage points).
    pub delta: Option<f64>,
    /// Δ's 95 % interval, t test and verdict against the reference row (paired by seed when both
    /// rows finished the same seeds, Welch's otherwise); none for the reference row or with
    /// fewer than two runs a side.
    pub delta_test: Option<Delta>,
    /// The smallest |Δ| against the reference that this study could detect (95 %, 80 % power)
    /// from the pooled seed spread of all its rows.
    pub detectable_delta: Option<f64>,
    pub best_metric_mean: Option<f64>,
    pub train_seconds_mean: Option<f64>,
    pub images_per_second_mean: Option<f64>,
}

/// How a task's metrics are named: in tables and plots (`headline`, `second`), in CSV columns
/// and plot file names (`headline_key`, `second_key`), and a sentence for the table's legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricNames {
    pub headline: &'static str,
    pub second: &'static str,
    pub headline_key: &'static str,
    pub second_key: &'static str,
    pub sentence: &'static str,
}

/// The metric names of a task.
pub fn metric_names(task: Task) -> MetricNames {
    match task {
        Task::Classification => MetricNames {
            headline: "Top-1",
            second: "Top-5",
            headline_key: "top1",
            second_key: "top5",
            sentence: "Top-1 and top-5 are the validation accuracy (%)",
        },
        Task::Segmentation => MetricNames {
            headline: "mIoU",
            second: "Pixel acc.",
            headline_key: "miou",
            second_key: "pixel_acc",
            sentence: "mIoU and pixel accuracy (%) are measured on the validation split",
        },
        Task::Detection => MetricNames {
            headline: "mAP",
            second: "AP50",
            headline_key: "map",
            second_key: "ap50",
            sentence: "mAP (COCO's AP@[.5:.95]) and AP50 (%) are measured on the validation split",
        },
    }
}

/// Where a run of a variant and seed lives.
pub fn run_dir(out: &Path, variant_dir: &str, seed: u64) -> PathBuf {
    out.join("runs")
        .join(variant_dir)
        .join(format!("seed-{seed}"))
}

/// Reads one run of a `task` from its folder.
pub fn read_run(task: Task, variant: &str, seed: u64, dir: &Path) -> Result<RunRecord> {
    let summary_path = dir.join("summary.json");
    let summary = if summary_path.exists() {
        Some(read_summary(task, &summary_path)?)
    } else {
        None
    };
    let metrics = read_metrics(task, &dir.join("metrics.jsonl"))?;
    let error = std::fs::read_to_string(dir.join("error.txt")).ok();
    let status = if summary.is_some() {
        RunStatus::Done
    } else if error.is_some() {
        RunStatus::Failed
    } else if !metrics.is_empty() || dir.join("config.toml").exists() {
        RunStatus::Incomplete
    } else {
        RunStatus::Pending
    };
    Ok(RunRecord {
        variant: variant.to_string(),
        seed,
        dir: dir.to_path_buf(),
        status,
        summary,
        error: if status == RunStatus::Failed {
            error
        } else {
            None
        },
        metrics,
    })
}

/// A run's `summary.json`, read as its task writes it (a segmentation summary written before the
/// metrics were named, which also carried `final_top1` etc., reads too).
pub fn read_summary(task: Task, path: &Path) -> Result<RunOutcome> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let not_summary = || format!("{} is not a run summary", path.display());
    Ok(match task {
        Task::Classification => {
            RunOutcome::from(&serde_json::from_str::<RunSummary>(&text).with_context(not_summary)?)
        }
        Task::Segmentation => {
            RunOutcome::from(&serde_json::from_str::<SegSummary>(&text).with_context(not_summary)?)
        }
        Task::Detection => {
            RunOutcome::from(&serde_json::from_str::<DetSummary>(&text).with_context(not_summary)?)
        }
    })
}

/// `metrics.jsonl` of a `task`'s run (one line per epoch); no file means no epochs.
pub fn read_metrics(task: Task, path: &Path) -> Result<Vec<EpochPoint>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(match task {
        Task::Classification => crate::metrics::read::<EpochMetrics>(path)?
            .into_iter()
            .map(EpochPoint::from)
            .collect(),
        Task::Segmentation => crate::metrics::read::<SegEpochMetrics>(path)?
            .into_iter()
            .map(EpochPoint::from)
            .collect(),
        Task::Detection => crate::metrics::read::<DetEpochMetrics>(path)?
            .into_iter()
            .map(EpochPoint::from)
            .collect(),
    })
}

/// Every run of a study, in table order (variant by variant, seeds in study order).
pub fn read_runs(out: &Path, manifest: &Manifest) -> Result<Vec<RunRecord>> {
    let mut runs = Vec::new();
    for v in &manifest.variants {
        for &seed in &manifest.seeds {
            runs.push(read_run(
                manifest.task,
                &v.name,
                seed,
                &run_dir(out, &v.dir, seed),
            )?);
        }
    }
    Ok(runs)
}

/// Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value).
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    stats::mean_std(values)
}

fn mean(values: &[f64]) -> Option<f64> {
    mean_std(values).map(|(m, _)| m)
}

/// The table rows: one per variant, over its finished runs, each against its reference row.
pub fn rows(manifest: &Manifest, runs: &[RunRecord]) -> Vec<VariantRow> {
    // Each variant's final headline metric by seed, over its finished runs.
    let finals: Vec<Vec<(u64, f64)>> = manifest
        .variants
        .iter()
        .map(|v| {
            runs.iter()
                .filter(|r| r.variant == v.name)
                .filter_map(|r| r.summary.as_ref().map(|s| (r.seed, s.final_metric)))
                .collect()
        })
        .collect();
    let values = |i: usize| finals[i].iter().map(|f| f.1).collect::<Vec<f64>>();
    let all: Vec<Vec<f64>> = (0..finals.len()).map(values).collect();
    let pooled = stats::pooled_std(&all.iter().map(|v| v.as_slice()).collect::<Vec<_>>());
    let mut rows: Vec<VariantRow> = manifest
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let done: Vec<&RunOutcome> = runs
                .iter()
                .filter(|r| r.variant == v.name)
                .filter_map(|r| r.summary.as_ref())
                .collect();
            let col = |f: fn(&RunOutcome) -> f64| done.iter().map(|s| f(s)).collect::<Vec<f64>>();
            let metric = stats::mean_ci(&all[i]);
            VariantRow {
                name: v.name.clone(),
                n: done.len(),
                runs: manifest.seeds.len(),
                metric_mean: metric.map(|t| t.mean),
                metric_std: metric.map(|t| t.std),
                metric_ci: metric.and_then(|t| t.half_width),
                second_mean: mean(&col(|s| s.final_second)),
                delta: None,
                delta_test: None,
                detectable_delta: None,
                best_metric_mean: mean(&col(|s| s.best_metric)),
                train_seconds_mean: mean(&col(|s| s.train_seconds)),
                images_per_second_mean: mean(&col(|s| s.images_per_second)),
            }
        })
        .collect();
    for i in 1..rows.len() {
        let reference = match manifest.mode {
            Mode::Independent => 0,
            Mode::Cumulative => i - 1,
        };
        let (Some(m), Some(r)) = (rows[i].metric_mean, rows[reference].metric_mean) else {
            continue;
        };
        rows[i].delta = Some(m - r);
        rows[i].delta_test = compare(&finals[i], &finals[reference]);
        if let Some((s, df)) = pooled {
            let (na, nb) = (finals[i].len(), finals[reference].len());
            rows[i].detectable_delta = Some(stats::detectable_delta(s, df, na, nb));
        }
    }
    if let Some(first) = rows.first_mut() {
        first.delta = first.metric_mean.map(|_| 0.0);
    }
    rows
}

/// `variant − reference` by seed: paired when both finished the same seeds, Welch's otherwise.
fn compare(variant: &[(u64, f64)], reference: &[(u64, f64)]) -> Option<Delta> {
    let seeds = |v: &[(u64, f64)]| {
        let mut s: Vec<u64> = v.iter().map(|x| x.0).collect();
        s.sort_unstable();
        s
    };
    if seeds(variant) == seeds(reference) {
        let by_seed = |v: &[(u64, f64)]| {
            let mut v = v.to_vec();
            v.sort_by_key(|x| x.0);
            v.into_iter().map(|x| x.1).collect::<Vec<f64>>()
        };
        stats::paired(&by_seed(variant), &by_seed(reference))
    } else {
        let values = |v: &[(u64, f64)]| v.iter().map(|x| x.1).collect::<Vec<f64>>();
        stats::welch(&values(variant), &values(reference))
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_default()
}

/// `results.csv`: one line per run, the task's metrics under their names.
pub fn results_csv(task: Task, runs: &[RunRecord]) -> String {
    let n = metric_names(task);
    let (m1, m2) = (n.headline_key, n.second_key);
    let mut s = format!(
        "variant,seed,{m1},{m2},best_{m1},best_epoch,train_seconds,images_per_second,status\n"
    );
    for r in runs {
        let m = r.summary.as_ref();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{}",
            csv_field(&r.variant),
            r.seed,
            opt(m.map(|m| m.final_metric), 4),
            opt(m.map(|m| m.final_second), 4),
            opt(m.map(|m| m.best_metric), 4),
            m.map(|m| m.best_epoch.to_string()).unwrap_or_default(),
            opt(m.map(|m| m.train_seconds), 2),
            opt(m.map(|m| m.images_per_second), 1),
            r.status.as_str()
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `12.3 s`, `4 min 05 s`, `1 h 02 min`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let m = (s / 60.0).floor();
        format!("{m:.0} min {:02.0} s", (s - 60.0 * m).floor())
    } else {
        let h = (s / 3600.0).floor();
        format!("{h:.0} h {:02.0} min", ((s - 3600.0 * h) / 60.0).floor())
    }
}

/// The `top-1 mean ± std` cell: two decimals, `± 0` with a single run.
pub fn format_mean_std(mean: f64, std: f64, n: usize) -> String {
    if n == 1 {
        format!("{mean:.2} ± 0")
    } else {
        format!("{mean:.2} ± {std:.2}")
    }
}

fn escape_md(s: &str) -> String {
    s.replace('|', "\\|")
}

/// `table.md`, in the layout of the paper's tables.
pub fn table_md(manifest: &Manifest, rows: &[VariantRow], runs: &[RunRecord]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}\n", manifest.name);
    if let Some(d) = &manifest.description {
        let _ = writeln!(s, "{}\n", d.trim());
    }
    let seeds: Vec<String> = manifest.seeds.iter().map(|x| x.to_string()).collect();
    let mode = match manifest.mode {
        Mode::Independent => "independent (each row is the base config plus that row's overrides)",
        Mode::Cumulative => {
            "cumulative (each row adds its overrides to those of every row above it)"
        }
    };
    let names = metric_names(manifest.task);
    let (m1, m5, what) = (names.headline, names.second, names.sentence);
    let reference = match manifest.mode {
        Mode::Independent => "first row",
        Mode::Cumulative => "row above",
    };
    let _ = writeln!(
        s,
        "{} seed{} ({}); mode: {mode}. {what} after the last epoch, \
         mean ± sample standard deviation (n − 1) over the seeds, and the 95 % confidence interval of the mean (Student t); \
         Δ is the mean {m1} minus that of the {reference} (percentage points), with its 95 % interval (paired by seed \
         when both rows finished the same seeds, Welch's otherwise) and the verdict it gives; \"detectable\" is the smallest |Δ| \
         this study would detect (95 %, 80 % power, from the pooled seed spread): a \"no difference detected\" rules out \
         larger differences only. Time is the mean training time per run (evaluation excluded). Base config: {}.\n",
        manifest.seeds.len(),
        if manifest.seeds.len() == 1 { "" } else { "s" },
        seeds.join(", "),
        manifest.base
    );
    let _ = writeln!(
        s,
        "| Variant | {m1} (%) | {m5} (%) | Δ {m1} | Time | Runs | {m1} 95 % CI | Δ 95 % CI | Verdict | Detectable Δ |"
    );
    let _ = writeln!(s, "|:--|--:|--:|--:|--:|--:|--:|--:|:--|--:|");
    for (i, r) in rows.iter().enumerate() {
        let top1 = match (r.metric_mean, r.metric_std) {
            (Some(m), Some(sd)) => format_mean_std(m, sd, r.n),
            _ => "–".into(),
        };
        let delta = match r.delta {
            _ if i == 0 => "–".to_string(),
            Some(d) => format!("{d:+.2}"),
            None => "–".into(),
        };
        let ci = match (r.metric_mean, r.metric_ci) {
            (Some(m), Some(h)) => format!("{:.2} – {:.2}", m - h, m + h),
            _ => "–".into(),
        };
        let (delta_ci, verdict) = match (&r.delta_test, i) {
            (_, 0) => ("–".to_string(), "reference".to_string()),
            (Some(d), _) => (
                format!("{:+.2} ± {:.2}", d.delta, d.half_width),
                d.verdict.as_str().to_string(),
            ),
            (None, _) => ("–".into(), "too few runs".into()),
        };
        let detectable = match (r.detectable_delta, i) {
            (Some(d), i) if i > 0 => format!("{d:.2}"),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {}/{} | {ci} | {delta_ci} | {verdict} | {detectable} |",
            escape_md(&r.name),
            top1,
            r.second_mean
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "–".into()),
            delta,
            r.train_seconds_mean
                .map(format_duration)
                .unwrap_or_else(|| "–".into()),
            r.n,
            r.runs
        );
    }
    let _ = writeln!(s, "\n## Variants\n");
    for v in &manifest.variants {
        let ov = if v.overrides.is_empty() {
            "no overrides".to_string()
        } else {
            v.overrides
                .iter()
                .map(|o| format!("`{o}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let desc = v
            .description
            .as_deref()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default();
        let _ = writeln!(s, "- **{}**: {ov}{desc}", escape_md(&v.name));
    }
    let failed: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.status == RunStatus::Failed)
        .collect();
    let unfinished: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| matches!(r.status, RunStatus::Incomplete | RunStatus::Pending))
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed runs\n");
        for r in failed {
            let err = r.error.as_deref().unwrap_or("").trim();
            let _ = writeln!(
                s,
                "- {} seed {}: {}",
                escape_md(&r.variant),
                r.seed,
                err.replace('\n', " ")
            );
        }
    }
    if !unfinished.is_empty() {
        let _ = writeln!(s, "\n## Unfinished runs (not in the statistics)\n");
        for r in unfinished {
            let _ = writeln!(
                s,
                "- {} seed {}: {} ({} epoch(s) logged)",
                escape_md(&r.variant),
                r.seed,
                r.status.as_str(),
                r.metrics.len()
            );
        }
    }
    let key = names.headline_key;
    let _ = writeln!(
        s,
        "\nPlots: val_{key}, train_loss, lr_schedule, delta_{key} (.png and .svg). Per-run results: results.csv."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), Some((7.0, 0.0)));
        assert_eq!(mean_std(&[]), None);
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(12.34), "12.3 s");
        assert_eq!(format_duration(245.0), "4 min 05 s");
        assert_eq!(format_duration(3720.0), "1 h 02 min");
    }
}
