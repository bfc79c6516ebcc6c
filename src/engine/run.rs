//! The run folder and what a run needs to know about where it runs: the options of a run, its
//! output files, starting or resuming from its checkpoints, and writing them.

use crate::checkpoint::{self, TrainState};
use crate::config::Config;
use crate::data::Shard;
use crate::distributed::ProcessGroup;
use crate::metrics::{self, EpochRecord};
use crate::train::optim::Sgd;
use crate::train::precision::LossScaler;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{nn, Device, Tensor};

/// How to run (as opposed to what to train, which is the config).
#[derive(Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    pub device: Device,
    /// Continue from the newest valid checkpoint in `out_dir/checkpoints`.
    pub resume: bool,
    /// Show progress bars (stderr).
    pub progress: bool,
    /// Set by a signal handler: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Where human-readable messages go.
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    /// The process group of a data-parallel run (None: a single process). Rank 0 writes the
    /// run folder and logs; every rank trains its shard of each global batch.
    pub dist: Option<Arc<ProcessGroup>>,
}

impl RunOptions {
    pub fn new(out_dir: impl Into<PathBuf>, device: Device) -> RunOptions {
        RunOptions {
            out_dir: out_dir.into(),
            device,
            resume: false,
            progress: false,
            stop: Arc::new(AtomicBool::new(false)),
            log: Arc::new(|m: &str| eprintln!("{m}")),
            dist: None,
        }
    }
}

/// One run as a task sees it: its config, device, place among the data-parallel ranks and
/// output files.
pub struct Run<'a> {
    pub cfg: &'a Config,
    pub opts: &'a RunOptions,
    pub device: Device,
    /// This process's share of each global batch and of the evaluation split.
    pub shard: Shard,
    /// Rank 0 (or the only process): writes the run folder and logs.
    pub rank0: bool,
    pub ckpt_dir: PathBuf,
    pub metrics_path: PathBuf,
}

impl<'a> Run<'a> {
    /// Checks the precision against the device, configures the device's threads and creates the
    /// run folder with the resolved config (rank 0).
    pub(crate) fn open(cfg: &'a Config, opts: &'a RunOptions) -> Result<Run<'a>> {
        let dist = opts.dist.as_ref();
        let rank0 = dist.is_none_or(|g| g.rank == 0);
        let shard = dist.map_or(Shard::SINGLE, |g| Shard {
            rank: g.rank,
            world: g.world_size,
        });
        let device = opts.device;
        crate::train::precision::check_supported(cfg.train.precision, device)?;
        crate::device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);
        let out = &opts.out_dir;
        let ckpt_dir = out.join("checkpoints");
        if rank0 {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create output folder {}", out.display()))?;
            std::fs::create_dir_all(&ckpt_dir)
                .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;
            checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())
                .with_context(|| format!("output folder {} is not writable", out.display()))?;
        }
        Ok(Run {
            cfg,
            opts,
            device,
            shard,
            rank0,
            ckpt_dir,
            metrics_path: out.join("metrics.jsonl"),
        })
    }

    /// A message for a person (rank 0 only).
    pub fn log(&self, message: &str) {
        if self.rank0 {
            (self.opts.log)(message)
        }
    }

    pub fn out_dir(&self) -> &Path {
        &self.opts.out_dir
    }

    /// Whether a stop was requested (a signal).
    pub(crate) fn stop_requested(&self) -> bool {
        self.opts.stop.load(Ordering::SeqCst)
    }

    /// Optimizer steps per epoch for a training set of `len` samples: each step takes a batch of
    /// `train.batch_size` on every rank.
    pub(crate) fn iters_per_epoch(&self, len: usize) -> Result<usize> {
        let bs = self.cfg.train.batch_size;
        let iters = len / (bs * self.shard.world);
        if iters == 0 {
            bail!(
                "key `train.batch_size` ({bs}{}) is larger than the training set ({len} images)",
                if self.shard.world > 1 {
                    format!(" per rank × {} ranks", self.shard.world)
                } else {
                    String::new()
                },
            );
        }
        Ok(iters)
    }

    /// Starts or resumes the run in the output folder, for every task. With `--resume`:
    /// restores weights, momentum, training state and loss scaler from the newest valid
    /// checkpoint (the config must be the one the run started with) and drops metrics lines of
    /// epochs it does not cover. Without: refuses a folder that already holds a run's
    /// checkpoints. A run that starts from scratch begins with no metrics. Returns whether it
    /// resumed.
    pub(crate) fn resume_or_start<M: EpochRecord>(
        &self,
        vs: &nn::VarStore,
        opt: &mut Sgd,
        scaler: &mut LossScaler,
        state: &mut TrainState,
    ) -> Result<bool> {
        let (opts, cfg) = (self.opts, self.cfg);
        let out = &opts.out_dir;
        let (ckpt_dir, metrics_path) = (&self.ckpt_dir, &self.metrics_path);
        if opts.resume {
            let mut warn = |m: String| (opts.log)(&format!("warning: {m}"));
            if let Some(ck) = checkpoint::latest_valid(ckpt_dir, &mut warn) {
                if ck.config.as_ref().is_some_and(|saved| saved != cfg) {
                    bail!(
                        "cannot resume {}: the config differs from the one the run started with (see {})",
                        out.display(),
                        out.join("config.toml").display()
                    );
                }
                checkpoint::copy_into(vs, &ck.tensors, &ck.path, None)?;
                opt.load_state(&ck.tensors)?;
                *state = ck.state.clone().unwrap_or_default();
                scaler.restore(state);
                metrics::truncate::<M>(metrics_path, state.epochs_done)?;
                (opts.log)(&format!(
                    "resuming from {} (epoch {} done, step {})",
                    ck.path.display(),
                    state.epochs_done,
                    state.global_step
                ));
                return Ok(true);
            }
            (opts.log)("no checkpoint to resume from: starting from scratch");
        } else if !checkpoint::list_epoch_checkpoints(ckpt_dir).is_empty()
            || ckpt_dir.join(checkpoint::INTERRUPT_FILE).exists()
        {
            bail!(
                "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        if metrics_path.exists() {
            std::fs::remove_file(metrics_path)
                .with_context(|| format!("cannot remove the old {}", metrics_path.display()))?;
        }
        Ok(false)
    }
}

/// Model tensors (parameters and BN statistics) in NCHW-contiguous layout.
fn model_tensors(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.detach().contiguous()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A checkpoint a run can resume from (weights, momentum buffers, config, classes, state): takes
/// a snapshot and returns the job that writes it, for [`checkpoint::Writer::submit`].
pub(crate) fn training_checkpoint(
    path: &Path,
    vs: &nn::VarStore,
    opt: &Sgd,
    cfg: &Config,
    classes: &[String],
    state: &TrainState,
) -> impl FnOnce() -> Result<()> + Send + 'static {
    let mut tensors = model_tensors(vs);
    tensors.extend(opt.state_tensors());
    checkpoint::save_later(path, tensors, Some(cfg), classes, Some(state))
}

/// Queues a weights-only checkpoint (loadable by `tricks eval`, as a teacher, or by timm).
pub fn save_weights(
    writer: &checkpoint::Writer,
    path: &Path,
    vs: &nn::VarStore,
    cfg: &Config,
    classes: &[String],
) -> Result<()> {
    writer.submit(checkpoint::save_later(
        path,
        model_tensors(vs),
        Some(cfg),
        classes,
        None,
    ))
}

pub(crate) fn progress_bar(
    show: bool,
    len: u64,
    epoch: usize,
    epochs: usize,
) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {epoch}/{epochs}"));
    bar
}
