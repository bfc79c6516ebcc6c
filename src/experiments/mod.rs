//! Experiments: ablation studies (`tricks ablate`), their tables and plots (`tricks report`).
//!
//! A study (`studies/*.toml`, see [`study`]) names a base config, seeds and variants; `ablate`
//! validates every variant's config, trains each (variant, seed) into
//! `<out>/runs/<variant>/seed-<s>/` (finished runs are skipped, interrupted ones resumed, failed
//! ones reported), then writes from what lies on disk:
//!
//! - `results.csv`: one line per run;
//! - `table.md`: the paper's layout, top-1 mean ± sample std over seeds, top-5, Δ top-1, time;
//! - `val_<metric>`, `train_loss`, `lr_schedule`, `delta_<metric>` as `.png` and `.svg` (the
//!   task's headline metric: `top1`, `miou`);
//! - `study.toml` (the study file as given), `study.json` (what `report` needs) and
//!   `configs/<variant>.toml` (each variant's resolved config).
//!
//! `report` rewrites the csv, the table and the plots from the runs on disk.
//!
//! Segmentation studies (`task = "segmentation"`) work the same way: their runs report mIoU and
//! pixel accuracy under the names top-1 and top-5, and the table and plots say so.

pub mod plots;
pub mod results;
pub mod stats;
pub mod study;

pub use results::{RunRecord, RunStatus, VariantRow};
pub use study::{study_device, Manifest, Mode, Study};

use crate::config::{Config, Task};
use crate::engine::RunOptions;
use anyhow::{bail, Context, Result};
pub use results::RunOutcome;
use serde::Serialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tch::Device;

/// How to run a study.
#[derive(Clone)]
pub struct AblateOptions {
    /// Trainings at once (each on its own thread; libtorch intra-op threads are split between them).
    pub jobs: usize,
    pub device: Device,
    /// Progress bars (only with one job: concurrent bars would garble each other).
    pub progress: bool,
    /// Set by a signal handler: running trainings checkpoint and stop, no new one starts.
    pub stop: Arc<AtomicBool>,
    /// Where human-readable messages go (each run's lines are prefixed with its name).
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    /// `key=value` overrides for every variant (`ablate --set`), after the study's own.
    pub overrides: Vec<String>,
    /// Seeds for every variant in place of the study's `seeds` (`ablate --seeds`).
    pub seeds: Option<Vec<u64>>,
}

impl AblateOptions {
    pub fn new(jobs: usize, device: Device) -> AblateOptions {
        AblateOptions {
            jobs,
            device,
            progress: false,
            stop: Arc::new(AtomicBool::new(false)),
            log: Arc::new(|m: &str| eprintln!("{m}")),
            overrides: Vec::new(),
            seeds: None,
        }
    }
}

/// What this call of `ablate` did and where the study stands.
#[derive(Debug, Clone, Serialize)]
pub struct StudyReport {
    pub name: String,
    pub mode: Mode,
    pub seeds: Vec<u64>,
    pub out_dir: PathBuf,
    /// Every run, in table order, as it lies on disk after this call.
    pub runs: Vec<RunRecord>,
    /// The table rows.
    pub rows: Vec<VariantRow>,
    /// Runs trained to the end by this call.
    pub trained: usize,
    /// Runs skipped because they had finished before (their `summary.json` exists).
    pub skipped: usize,
    /// Runs that failed in this call: (variant, seed, error).
    pub failed: Vec<(String, u64, String)>,
    /// True when a stop request ended the study before every run was done.
    pub interrupted: bool,
}

impl StudyReport {
    /// One line for a person: counts and where the outputs are.
    pub fn summary_line(&self) -> String {
        let done = self
            .runs
            .iter()
            .filter(|r| r.status == RunStatus::Done)
            .count();
        format!(
            "study {}: {done}/{} runs done ({} trained now, {} already finished, {} failed{}); table, csv and plots in {}",
            self.name,
            self.runs.len(),
            self.trained,
            self.skipped,
            self.failed.len(),
            if self.interrupted { ", interrupted" } else { "" },
            self.out_dir.display()
        )
    }
}

/// Runs a study file into `out` (see the module docs); `jobs` trainings at once.
pub fn ablate(
    study: &Path,
    out: &Path,
    jobs: usize,
    device: Device,
    progress: bool,
) -> Result<StudyReport> {
    let mut opts = AblateOptions::new(jobs, device);
    opts.progress = progress;
    ablate_with(study, out, &opts)
}

/// One (variant, seed) to train.
struct Job {
    variant: usize,
    seed: u64,
    dir: PathBuf,
    cfg: Config,
}

enum Outcome {
    Trained(RunOutcome),
    Interrupted,
    Failed(String),
}

/// [`ablate`] with every option (stop flag, log sink).
pub fn ablate_with(study_path: &Path, out: &Path, opts: &AblateOptions) -> Result<StudyReport> {
    let study = Study::load_with(study_path, &opts.overrides, opts.seeds.as_deref())?;
    study
        .check_inputs()
        .with_context(|| format!("study {}", study_path.display()))?;
    for (i, v) in study.variants.iter().enumerate() {
        crate::train::precision::check_supported(v.config.train.precision, opts.device)
            .with_context(|| format!("variant {} (`{}`): key `train.precision`", i + 1, v.name))?;
    }
    let plan = plan_runs(&study, out, opts.jobs.max(1))?;
    write_study_files(&study, out, plan.threads)?;
    (opts.log)(&format!(
        "study {} ({} mode): {} variants x {} seeds; {} finished before, {} to train, {} at a time{}, on {:?} → {}",
        study.name,
        study.mode.as_str(),
        study.variants.len(),
        study.seeds.len(),
        plan.skipped,
        plan.pending.len(),
        plan.workers,
        if plan.workers > 1 { format!(" ({} libtorch threads each unless the study sets train.threads)", plan.threads) } else { String::new() },
        opts.device,
        out.display()
    ));
    let outcomes = run_jobs(&study, &plan, opts);
    let mut trained = 0;
    let mut failed = Vec::new();
    let mut interrupted = opts.stop.load(Ordering::SeqCst);
    for (job, outcome) in plan.pending.iter().zip(&outcomes) {
        match outcome {
            Some(Outcome::Trained(_)) => trained += 1,
            Some(Outcome::Failed(e)) => failed.push((
                study.variants[job.variant].name.clone(),
                job.seed,
                e.clone(),
            )),
            Some(Outcome::Interrupted) | None => interrupted = true,
        }
    }

    let (_, runs, rows) = write_outputs(out)?;
    Ok(StudyReport {
        name: study.name.clone(),
        mode: study.mode,
        seeds: study.seeds.clone(),
        out_dir: out.to_path_buf(),
        runs,
        rows,
        trained,
        skipped: plan.skipped,
        failed,
        interrupted,
    })
}

/// The runs a study still has to train, and how many at a time.
struct Plan {
    pending: Vec<Job>,
    /// Runs that finished before (their `summary.json` exists).
    skipped: usize,
    /// Trainings at once, and libtorch threads each.
    workers: usize,
    threads: usize,
}

/// Every run, seed by seed, so that an interrupted study has complete rows of seed 1 first; a run
/// begun before with another config is refused.
fn plan_runs(study: &Study, out: &Path, jobs: usize) -> Result<Plan> {
    let mut pending = Vec::new();
    let mut skipped = 0;
    let mut all = Vec::new();
    for &seed in &study.seeds {
        for (vi, v) in study.variants.iter().enumerate() {
            all.push((vi, seed, results::run_dir(out, &v.dir, seed)));
        }
    }
    let to_train = all
        .iter()
        .filter(|(_, _, d)| !d.join("summary.json").exists())
        .count();
    let workers = jobs.min(to_train.max(1));
    let threads = (num_cpus::get() / workers).max(1);
    for (vi, seed, dir) in all {
        let mut cfg = study.run_config(vi, seed, threads);
        let label = format!(
            "run {} (variant `{}`, seed {seed})",
            dir.display(),
            study.variants[vi].name
        );
        if let Some(old) = previous_config(&dir).with_context(|| label.clone())? {
            let diff = config_diff(&old, &cfg)?;
            if !diff.is_empty() {
                bail!(
                    "{label} was started with a different config (keys {}); the study changed since: use another --out, or delete that run folder",
                    diff.join(", ")
                );
            }
            // The thread count does not change what is trained; keep the one the run began with,
            // so that resuming it passes the trainer's config check.
            cfg.train.threads = old.train.threads;
        }
        if dir.join("summary.json").exists() {
            results::read_run(cfg.task, &study.variants[vi].name, seed, &dir)?;
            skipped += 1;
        } else {
            pending.push(Job {
                variant: vi,
                seed,
                dir,
                cfg,
            });
        }
    }
    Ok(Plan {
        pending,
        skipped,
        workers,
        threads,
    })
}

/// `study.toml`, `study.json` and each variant's resolved config under `configs/`.
fn write_study_files(study: &Study, out: &Path, threads: usize) -> Result<()> {
    std::fs::create_dir_all(out.join("configs"))
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    write(&out.join("study.toml"), &study.text)?;
    write(
        &out.join("study.json"),
        &serde_json::to_string_pretty(&study.manifest())?,
    )?;
    let seeds: Vec<String> = study.seeds.iter().map(|s| s.to_string()).collect();
    for (vi, v) in study.variants.iter().enumerate() {
        let cfg = study.run_config(vi, study.seeds[0], threads);
        let text = format!(
            "# Variant `{}` of study `{}` ({} mode), resolved. `seed` is set per run (seeds {}),{}\n# each run's exact config is runs/{}/seed-<s>/config.toml.\n{}",
            v.name,
            study.name,
            study.mode.as_str(),
            seeds.join(", "),
            if v.sets_threads { "" } else { " `train.threads` per --jobs;" },
            v.dir,
            cfg.to_toml()
        );
        write(&out.join("configs").join(format!("{}.toml", v.dir)), &text)?;
    }
    Ok(())
}

/// Trains the pending runs, `plan.workers` at a time, until done or stopped; the outcome of each
/// (`None`: never started).
fn run_jobs(study: &Study, plan: &Plan, opts: &AblateOptions) -> Vec<Option<Outcome>> {
    let log = |m: &str| (opts.log)(m);
    let (pending, workers) = (&plan.pending, plan.workers);
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<Outcome>>> =
        Mutex::new((0..pending.len()).map(|_| None).collect());
    let total = pending.len();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if opts.stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let job = &pending[i];
                let name = &study.variants[job.variant].name;
                log(&format!("[{name} seed {}] starting ({}/{total})", job.seed, i + 1));
                let outcome = run_job(job, name, opts, workers == 1);
                match &outcome {
                    Outcome::Trained(s) => {
                        let n = results::metric_names(job.cfg.task);
                        let (m1, m2) = (n.headline, n.second);
                        log(&format!(
                            "[{name} seed {}] done: {m1} {:.2}% {m2} {:.2}% (best {:.2}% at epoch {}), {:.1}s",
                            job.seed, s.final_metric, s.final_second, s.best_metric, s.best_epoch, s.train_seconds
                        ))
                    }
                    Outcome::Interrupted => log(&format!("[{name} seed {}] interrupted; rerun the study to resume it", job.seed)),
                    Outcome::Failed(e) => log(&format!("[{name} seed {}] FAILED: {e}", job.seed)),
                }
                outcomes.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(outcome);
            });
        }
    });
    outcomes.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Rewrites `results.csv`, `table.md` and the plots of a study folder from the runs on disk.
pub fn report(dir: &Path) -> Result<()> {
    write_outputs(dir).map(|_| ())
}

/// Reads a study folder (its `study.json` and runs) without writing anything.
pub fn load_results(dir: &Path) -> Result<(Manifest, Vec<RunRecord>, Vec<VariantRow>)> {
    let path = dir.join("study.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a study output folder (no study.json; `tricks ablate` writes it)",
            dir.display()
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    let runs = results::read_runs(dir, &manifest)?;
    let rows = results::rows(&manifest, &runs);
    Ok((manifest, runs, rows))
}

fn write_outputs(dir: &Path) -> Result<(Manifest, Vec<RunRecord>, Vec<VariantRow>)> {
    let (manifest, runs, rows) = load_results(dir)?;
    // study.json: the manifest `report` reads, with each variant's statistics beside it.
    let mut json = serde_json::to_value(&manifest)?;
    json["statistics"] = serde_json::to_value(&rows)?;
    write(
        &dir.join("study.json"),
        &serde_json::to_string_pretty(&json)?,
    )?;
    write(
        &dir.join("results.csv"),
        &results::results_csv(manifest.task, &runs),
    )?;
    write(
        &dir.join("table.md"),
        &results::table_md(&manifest, &rows, &runs),
    )?;
    let configs: Vec<Option<Config>> = manifest
        .variants
        .iter()
        .map(|v| {
            let resolved = dir.join("configs").join(format!("{}.toml", v.dir));
            let first_run = manifest
                .seeds
                .iter()
                .map(|&s| results::run_dir(dir, &v.dir, s).join("config.toml"));
            std::iter::once(resolved)
                .chain(first_run)
                .filter(|p| p.exists())
                .find_map(|p| crate::recipe::load(&p, &[]).ok())
        })
        .collect();
    plots::write_plots(dir, &manifest, &runs, &rows, &configs)?;
    Ok((manifest, runs, rows))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Trains one run; errors and panics become [`Outcome::Failed`] (kept in `error.txt`).
fn run_job(job: &Job, name: &str, opts: &AblateOptions, single: bool) -> Outcome {
    let error_path = job.dir.join("error.txt");
    let _ = std::fs::remove_file(&error_path);
    let mut ro = RunOptions::new(&job.dir, opts.device);
    ro.resume = true;
    ro.progress = opts.progress && single;
    ro.stop = opts.stop.clone();
    let prefix = format!("[{name} seed {}] ", job.seed);
    let sink = opts.log.clone();
    let log_path = job.dir.join("train.log");
    ro.log = Arc::new(move |m: &str| {
        sink(&format!("{prefix}{m}"));
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            let _ = writeln!(f, "{m}");
        }
    });
    let started = Instant::now();
    let result = std::fs::create_dir_all(&job.dir)
        .with_context(|| format!("cannot create {}", job.dir.display()))
        .and_then(|_| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.cfg.task {
                Task::Classification => {
                    crate::classify::train(&job.cfg, &ro).map(|s| RunOutcome::from(&s))
                }
                Task::Segmentation => {
                    crate::segment::train(&job.cfg, &ro).map(|s| RunOutcome::from(&s))
                }
                Task::Detection => {
                    crate::detect::train(&job.cfg, &ro).map(|s| RunOutcome::from(&s))
                }
            }))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("training panicked: {}", panic_text(&p))))
        });
    match result {
        Ok(s) if s.stopped_early => Outcome::Interrupted,
        Ok(s) => Outcome::Trained(s),
        Err(e) => {
            let text = format!("{e:#}");
            let _ = std::fs::write(
                &error_path,
                format!(
                    "{text}\n(after {:.1}s; rerun the study to retry this run)\n",
                    started.elapsed().as_secs_f64()
                ),
            );
            Outcome::Failed(text)
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// The config a run folder was started with, if any.
fn previous_config(dir: &Path) -> Result<Option<Config>> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(None);
    }
    crate::recipe::load(&path, &[]).map(Some).with_context(|| {
        format!(
            "{} cannot be read as a config (delete the run folder to start it again)",
            path.display()
        )
    })
}

/// Keys whose values differ between two configs, with both values; `train.threads` and the
/// keys a resume may change ([`crate::config::RESUME_NEUTRAL_KEYS`]) aside.
fn config_diff(a: &Config, b: &Config) -> Result<Vec<String>> {
    Ok(crate::config::diff(a, b)
        .into_iter()
        .filter(|c| {
            c.key != "train.threads"
                && !crate::config::RESUME_NEUTRAL_KEYS.contains(&c.key.as_str())
        })
        .map(|c| c.to_string())
        .collect())
}
