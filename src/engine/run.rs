//! The run folder and what a run needs to know about where it runs: the options of a run, its
//! output files, starting or resuming from its checkpoints, and writing them.

use crate::checkpoint::{self, TrainState};
use crate::config::{self, Config};
use crate::data::Shard;
use crate::device::IntraOpThreads;
use crate::distributed::ProcessGroup;
use crate::metrics::{self, EpochRecord};
use crate::train::optim::Optimizer;
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
    /// libtorch's intra-op threads, adapted to the cores left free when `train.threads` is 0.
    pub threads: IntraOpThreads,
}

impl<'a> Run<'a> {
    /// Checks the precision against the device and configures the device's threads. Creates
    /// nothing: the run folder is made by [`Run::prepare_folder`] once the task's data is open.
    pub(crate) fn open(cfg: &'a Config, opts: &'a RunOptions) -> Result<Run<'a>> {
        let dist = opts.dist.as_ref();
        let rank0 = dist.is_none_or(|g| g.rank == 0);
        let shard = dist.map_or(Shard::SINGLE, |g| Shard {
            rank: g.rank,
            world: g.world_size,
        });
        let device = opts.device;
        crate::train::precision::check_supported(cfg.train.precision, device)?;
        let threads =
            crate::device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);
        let out = &opts.out_dir;
        Ok(Run {
            cfg,
            opts,
            device,
            shard,
            rank0,
            ckpt_dir: out.join("checkpoints"),
            metrics_path: out.join("metrics.jsonl"),
            threads,
        })
    }

    /// Rank 0, once the task has opened (and so validated) its data: checks the output folder
    /// (not a broken link, not inside the data folder nor holding it), creates it, locks it
    /// against a second training and removes the temporary files of writers that died. The
    /// lock lasts as long as the returned value (and dies with the process). Other ranks write
    /// nothing and get `None`.
    pub(crate) fn prepare_folder(&self) -> Result<Option<FolderLock>> {
        if !self.rank0 {
            return Ok(None);
        }
        let out = &self.opts.out_dir;
        check_out_dir(out, &self.cfg.data.dir)?;
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output folder {}", out.display()))?;
        let lock = FolderLock::take(out, &*self.opts.log)?;
        std::fs::create_dir_all(&self.ckpt_dir)
            .with_context(|| format!("cannot create {}", self.ckpt_dir.display()))?;
        for dir in [out.as_path(), self.ckpt_dir.as_path()] {
            for (path, pid) in checkpoint::stale_temporaries(dir) {
                match std::fs::remove_file(&path) {
                    Ok(()) => (self.opts.log)(&format!(
                        "removed {}, left by process {pid}, which no longer runs",
                        path.display()
                    )),
                    Err(e) => (self.opts.log)(&format!(
                        "warning: cannot remove {} (left by process {pid}): {e}",
                        path.display()
                    )),
                }
            }
        }
        Ok(Some(lock))
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
    /// checkpoint (the config must be the one the run started with, but for the loader's settings and
    /// `train.threads`) and drops metrics lines of
    /// epochs it does not cover. Without: refuses a folder that already holds a run's
    /// checkpoints. A run that starts from scratch begins with no metrics. The resolved config
    /// is written to `config.toml` only once the run goes ahead (a refused command changes
    /// nothing). Returns whether it resumed.
    pub(crate) fn resume_or_start<M: EpochRecord>(
        &self,
        vs: &nn::VarStore,
        opt: &mut Optimizer,
        scaler: &mut LossScaler,
        state: &mut TrainState,
    ) -> Result<bool> {
        let (opts, cfg) = (self.opts, self.cfg);
        let out = &opts.out_dir;
        let (ckpt_dir, metrics_path) = (&self.ckpt_dir, &self.metrics_path);
        let resumed = if opts.resume {
            let mut warn = |m: String| (opts.log)(&format!("warning: {m}"));
            match checkpoint::latest_valid(ckpt_dir, &mut warn) {
                Some(ck) => {
                    if let Some(saved) = &ck.config {
                        check_resumable(saved, cfg, &ck.path, out, &*opts.log)?;
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
                    true
                }
                None => {
                    (opts.log)("no checkpoint to resume from: starting from scratch");
                    false
                }
            }
        } else if !checkpoint::list_epoch_checkpoints(ckpt_dir).is_empty()
            || ckpt_dir.join(checkpoint::INTERRUPT_FILE).exists()
        {
            bail!(
                "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        } else {
            false
        };
        if !resumed && metrics_path.exists() {
            std::fs::remove_file(metrics_path)
                .with_context(|| format!("cannot remove the old {}", metrics_path.display()))?;
        }
        // Only now that the run goes ahead: a refused command leaves the folder as it was.
        checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())
            .with_context(|| format!("output folder {} is not writable", out.display()))?;
        Ok(resumed)
    }
}

/// Refuses to resume from a checkpoint whose config differs from `cfg` in a key that changes
/// what is computed, naming every such key with both values (and, when the seed differs, that
/// the checkpoint is another run's). Loader settings and logging ([`config::RESUME_NEUTRAL_KEYS`])
/// may change, and so may `train.max_steps` (where the run stops, not what each step computes: a
/// run stopped by it resumes without it); `train.threads` may too, with a warning.
fn check_resumable(
    saved: &Config,
    cfg: &Config,
    ckpt: &Path,
    out: &Path,
    log: &(dyn Fn(&str) + Send + Sync),
) -> Result<()> {
    let changes = config::diff(saved, cfg);
    let blocking: Vec<String> = changes
        .iter()
        .filter(|c| {
            !["train.threads", "train.max_steps"].contains(&c.key.as_str())
                && !config::RESUME_NEUTRAL_KEYS.contains(&c.key.as_str())
        })
        .map(|c| c.to_string())
        .collect();
    if !blocking.is_empty() {
        let other_run = if saved.seed != cfg.seed {
            format!(
                "; the checkpoint is from another run (its seed is {}, not {})",
                saved.seed, cfg.seed
            )
        } else {
            String::new()
        };
        bail!(
            "cannot resume {}: the config differs from the one of {} in {}{other_run}",
            out.display(),
            ckpt.display(),
            blocking.join(", ")
        );
    }
    if let Some(c) = changes.iter().find(|c| c.key == "train.threads") {
        log(&format!(
            "warning: key `train.threads` changed from {} to {}: the resumed run goes on, but is no longer bit-identical to an uninterrupted one",
            c.old, c.new
        ));
    }
    Ok(())
}

/// The output folder, checked before anything is created in it: a broken symbolic link, an output folder inside the data folder, or a data folder inside the output
/// folder are refused, naming both.
fn check_out_dir(out: &Path, data_dir: &str) -> Result<()> {
    let checkpoints = out.join("checkpoints");
    let paths = std::iter::once(checkpoints.as_path()).chain(out.ancestors());
    for p in paths.filter(|p| !p.as_os_str().is_empty()) {
        let is_link = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        if is_link && std::fs::metadata(p).is_err() {
            let target = std::fs::read_link(p)
                .map_or_else(|e| format!("? ({e})"), |t| t.display().to_string());
            bail!(
                "cannot create output folder {}: {} is a broken symbolic link (it points to {target}, which does not exist)",
                out.display(),
                p.display()
            );
        }
    }
    if data_dir.is_empty() {
        return Ok(());
    }
    let Ok(data) = std::fs::canonicalize(data_dir) else {
        return Ok(());
    };
    let out_abs = canonical_or_lexical(out)?;
    if out_abs.starts_with(&data) {
        bail!(
            "output folder {} ({}) is inside the data folder {} ({}): choose an --out outside the dataset",
            out.display(),
            out_abs.display(),
            data_dir,
            data.display()
        );
    }
    if data.starts_with(&out_abs) {
        bail!(
            "the data folder {} ({}) is inside the output folder {} ({}): choose an --out that does not hold the dataset",
            data_dir,
            data.display(),
            out.display(),
            out_abs.display()
        );
    }
    Ok(())
}

/// `path` made absolute with its longest existing ancestor canonicalised (symbolic links
/// resolved) and the rest, which does not exist yet, appended as written.
fn canonical_or_lexical(path: &Path) -> Result<PathBuf> {
    let abs = std::env::current_dir()
        .context("cannot read the current folder")?
        .join(path);
    let mut missing = Vec::new();
    let mut base = abs.as_path();
    let root = loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            break c;
        }
        match (base.file_name(), base.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name.to_owned());
                base = parent;
            }
            _ => break base.to_path_buf(),
        }
    };
    let mut p = root;
    for name in missing.into_iter().rev() {
        p.push(name);
    }
    Ok(p)
}

/// The lock of a run folder: an exclusive `flock` on `<out>/.lock`, which the OS releases when
/// the process ends, however it ends (a left-over file without a holder locks nothing). The
/// holder's pid is written into the file for the message of the command it turns away.
pub(crate) struct FolderLock {
    _file: std::fs::File,
}

/// The lock file in a run folder.
pub const LOCK_FILE: &str = ".lock";

impl FolderLock {
    fn take(out: &Path, log: &(dyn Fn(&str) + Send + Sync)) -> Result<FolderLock> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = out.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("output folder {} is not writable", out.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_string(),
                };
                bail!(
                    "output folder {} is in use: {holder} is training into it (it holds {}); wait for it to end, or choose another --out",
                    out.display(),
                    path.display()
                );
            }
            // A file system without flock (some network mounts): go on unguarded.
            log(&format!(
                "warning: cannot lock {} ({err}): nothing stops a second training into this folder",
                path.display()
            ));
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(FolderLock { _file: file })
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
    opt: &Optimizer,
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
