//! One training run: data → model → epochs of (train, evaluate, checkpoint) → summary.

use super::data_parallel::{dump_rank_weights, sync_from_rank0, DataParallel};
use super::lookahead::Lookahead;
use super::loss::{
    distillation_loss, smooth_targets, smoothed_cross_entropy, soft_cross_entropy, top1_hits,
    topk_hits,
};
use super::optim::Sgd;
use super::precision::{check_supported, Autocast, LossScaler};
use super::schedule::LrSchedule;
use super::{clip, derive_seed, mixup};
use crate::checkpoint::{self, TrainState};
use crate::config::{Config, Precision};
use crate::data::{self, Batch, Batches, Loader, Resident, Shard};
use crate::device::{to_channels_last, upload, weights_to_channels_last};
use crate::distributed::ProcessGroup;
use crate::metrics;
use crate::model::{self, Classifier};
use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

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

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Learning rate at the last step of the epoch.
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: Option<f64>,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
    /// Training throughput of this epoch (loading + augmentation + training, no evaluation).
    pub images_per_second: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
    #[serde(default)]
    pub skipped_images: usize,
    /// Time the training loop waited for its next batch (timm's `data_time`, summed over the
    /// epoch): the loader's cost to training. Near 0 when prefetching keeps up.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// Wall time of the epoch's evaluation pass (0 without one); part of `seconds`.
    #[serde(default)]
    pub eval_seconds: f64,
}

/// What a finished run reports (also written to `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub epochs: usize,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub final_top1: f64,
    pub final_top5: f64,
    pub final_val_loss: f64,
    pub train_seconds: f64,
    pub images_per_second: f64,
    /// True when the run stopped early on a signal or `train.max_steps`.
    pub stopped_early: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub samples: usize,
}

/// How an evaluation runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalSettings {
    pub device: Device,
    pub precision: Precision,
    /// Whether the model's weights are channels_last (inputs are converted to match).
    pub channels_last: bool,
    /// Test-time flip (`train.eval_flip`): score the mean logits of each image and its mirror.
    pub flip: bool,
    /// Test-time translation (`train.eval_translate`): ½ the logits of each image (with `flip`,
    /// of it and its mirror) plus ¼ those of each of its copies shifted one pixel up-left and
    /// down-right.
    pub translate: bool,
}

/// Top-1/top-5 accuracy (%) and mean cross-entropy of a model over a loader.
pub fn evaluate(
    model: &Classifier,
    loader: impl Iterator<Item = Result<Batch>>,
    settings: EvalSettings,
) -> Result<EvalResult> {
    EvalSums::over(model, loader, settings)?.result()
}

/// Evaluation logits (f32) of a batch already on the device. With `flip`, test-time flip
/// augmentation: the mean of the logits of the images and of their mirror images (the training
/// flips too, so both views are in-distribution; airbench scores this way). With `translate`,
/// airbench94's test-time translation on top (see [`EvalSettings::translate`]).
fn eval_logits(model: &Classifier, x: &Tensor, settings: EvalSettings) -> Tensor {
    tch::no_grad(|| {
        let _ac = Autocast::enter(settings.precision, settings.device);
        let view = |x: &Tensor| {
            let logits = model.forward_t(x, false).to_kind(Kind::Float);
            if settings.flip {
                (logits + model.forward_t(&x.flip([3]), false).to_kind(Kind::Float)) * 0.5
            } else {
                logits
            }
        };
        let logits = view(x);
        if !settings.translate {
            return logits;
        }
        let (h, w) = (x.size()[2], x.size()[3]);
        let padded = x.reflection_pad2d([1, 1, 1, 1]);
        let shifted = |at: i64| {
            let s = padded.narrow(2, at, h).narrow(3, at, w);
            view(&if settings.channels_last {
                to_channels_last(&s)
            } else {
                s.contiguous()
            })
        };
        logits * 0.5 + (shifted(0) + shifted(2)) * 0.25
    })
}

/// Evaluation sums (summable over the ranks of a data-parallel run).
#[derive(Debug, Clone, Copy, Default)]
struct EvalSums {
    loss: f64,
    top1: f64,
    top5: f64,
    samples: f64,
}

impl EvalSums {
    fn over(
        model: &Classifier,
        loader: impl Iterator<Item = Result<Batch>>,
        settings: EvalSettings,
    ) -> Result<EvalSums> {
        let device = settings.device;
        // Sums stay on the device until the end: a read per batch would stall a GPU's queue.
        let zero = |kind| Tensor::zeros([], (kind, device));
        let (mut loss_sum, mut c1, mut c5, mut n) = (
            zero(Kind::Double),
            zero(Kind::Int64),
            zero(Kind::Int64),
            0usize,
        );
        for batch in loader {
            let batch = batch?;
            let x = to_device_input(&batch.images, device, settings.channels_last);
            let y = upload(&batch.labels, device);
            let logits = eval_logits(model, &x, settings);
            let b = y.size()[0] as usize;
            loss_sum += logits.cross_entropy_for_logits(&y).to_kind(Kind::Double) * b as f64;
            let (a, k) = topk_hits(&logits, &y, 5);
            c1 += a;
            c5 += k;
            n += b;
        }
        Ok(EvalSums {
            loss: f64::try_from(&loss_sum)?,
            top1: c1.int64_value(&[]) as f64,
            top5: c5.int64_value(&[]) as f64,
            samples: n as f64,
        })
    }

    fn all_ranks(self, dp: Option<&DataParallel>) -> Result<EvalSums> {
        let Some(dp) = dp else { return Ok(self) };
        let v = dp.sum(&[self.loss, self.top1, self.top5, self.samples])?;
        Ok(EvalSums {
            loss: v[0],
            top1: v[1],
            top5: v[2],
            samples: v[3],
        })
    }

    fn result(self) -> Result<EvalResult> {
        let n = self.samples;
        if n == 0.0 {
            bail!("the evaluation split has no usable images");
        }
        Ok(EvalResult {
            loss: self.loss / n,
            top1: 100.0 * self.top1 / n,
            top5: 100.0 * self.top5 / n,
            samples: n as usize,
        })
    }
}

/// The first `n` images of a split's evaluation batches (fewer if it is smaller): as the
/// evaluation transform gives them, normalised, on the batches' device.
fn first_images(batches: impl Iterator<Item = Result<Batch>>, n: usize) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    let mut have = 0usize;
    for batch in batches {
        if have >= n {
            break;
        }
        let images = batch?.images;
        let take = (n - have).min(images.size()[0] as usize);
        out.push(images.narrow(0, 0, take as i64));
        have += take;
    }
    Ok(out)
}

/// `train.untimed_warmup`: before the first epoch, one training step on `step.batch` (forward
/// in training mode, the label-smoothed loss, then the trainer's own [`optimizer_step`] and a
/// lookahead average) and the evaluation's forward passes on `eval` (full batches and, when the
/// split does not divide into them, the last `eval_tail` images), so that cuDNN's autotuning for
/// these shapes and each kernel's first-use loading happen outside the timed epochs, as in
/// airbench's warm-up run. Nothing is kept: the variables (BN statistics included), the
/// optimiser's momentum, lookahead's slow weights and the loss scaler's state are put back, the
/// gradients zeroed. Mixup's and distillation's targets are not warmed.
#[allow(clippy::too_many_arguments)]
fn untimed_warmup(
    net: &Classifier,
    vs: &nn::VarStore,
    opt: &mut Sgd,
    scaler: &mut LossScaler,
    step: WarmupStep,
    eval: &Batch,
    eval_tail: usize,
    settings: EvalSettings,
) -> Result<()> {
    let saved: Vec<(Tensor, Tensor)> = vs
        .variables()
        .into_values()
        .map(|v| {
            let copy = tch::no_grad(|| v.detach().copy());
            (v, copy)
        })
        .collect();
    let saved_optimiser = opt.snapshot();
    let mut saved_scaler = TrainState::default();
    scaler.record(&mut saved_scaler);
    let x = to_device_input(&step.batch.images, settings.device, settings.channels_last);
    let y = upload(&step.batch.labels, settings.device);
    let loss = {
        let _ac = Autocast::enter(settings.precision, settings.device);
        let logits = net.forward_t(&x, true);
        let _ = top1_hits(&logits, &y);
        smoothed_cross_entropy(&logits, &y, step.num_classes, step.cfg.loss.label_smoothing)
    };
    let at = StepPosition {
        epoch: 1,
        step_in_epoch: 0,
        global_step: 0,
    };
    optimizer_step(
        &loss,
        opt,
        scaler,
        &step.cfg.optim,
        step.lr,
        step.ckpt_dir,
        at,
        None,
        false,
        false,
    )?;
    if let Some(la) = opt.lookahead_mut() {
        la.warm_up();
    }
    opt.zero_grad();
    let x = to_device_input(&eval.images, settings.device, settings.channels_last);
    let _ = eval_logits(net, &x, settings);
    if eval_tail > 0 && (eval_tail as i64) < x.size()[0] {
        let _ = eval_logits(net, &x.narrow(0, 0, eval_tail as i64), settings);
    }
    tch::no_grad(|| {
        for (mut v, copy) in saved {
            v.copy_(&copy);
        }
    });
    opt.restore(saved_optimiser);
    scaler.restore(&saved_scaler);
    if let Device::Cuda(i) = settings.device {
        tch::Cuda::synchronize(i as i64);
    }
    Ok(())
}

/// The training step of [`untimed_warmup`]: its batch (one of epoch 1 from a device-resident
/// dataset, so that the augmentation's kernels load too), the loss's class count, the learning
/// rate, the run's config (loss and optimiser settings) and its checkpoint folder (which the
/// step's errors name).
struct WarmupStep<'a> {
    batch: &'a Batch,
    num_classes: i64,
    lr: f64,
    cfg: &'a Config,
    ckpt_dir: &'a Path,
}

/// Moves a batch to the device, in NHWC memory layout when `channels_last`.
pub(crate) fn to_device_input(x: &Tensor, device: Device, channels_last: bool) -> Tensor {
    let x = upload(x, device);
    if channels_last {
        to_channels_last(&x)
    } else {
        x
    }
}

/// A teacher for knowledge distillation: any model this project can build, from its checkpoint,
/// in eval mode and without gradients.
struct Teacher {
    model: Classifier,
    _vs: nn::VarStore,
}

fn load_teacher(
    path: &Path,
    device: Device,
    num_classes: i64,
    channels_last: bool,
) -> Result<Teacher> {
    let (model, vs, _cfg, classes) = model::load_model(path, device)
        .with_context(|| format!("key `distill.teacher`: cannot load {}", path.display()))?;
    let k = classes.len() as i64;
    if k != 0 && k != num_classes {
        bail!(
            "key `distill.teacher`: {} predicts {k} classes, the student's dataset has {num_classes}",
            path.display()
        );
    }
    for (_, mut v) in vs.variables() {
        let _ = v.requires_grad_(false);
    }
    if channels_last {
        weights_to_channels_last(&vs);
    }
    Ok(Teacher { model, _vs: vs })
}

/// Fine-tuning (`[finetune]`): loads every tensor but the classifier from `finetune.from`
/// (shape mismatches name the tensor and both shapes) and, for a linear probe, freezes the
/// backbone. Returns whether the run is a linear probe.
fn init_from_finetune(cfg: &Config, vs: &nn::VarStore, log: &dyn Fn(&str)) -> Result<bool> {
    if cfg.finetune.from.is_empty() {
        return Ok(false);
    }
    let path = Path::new(&cfg.finetune.from);
    let ckpt = checkpoint::load(path).with_context(|| "key `finetune.from`".to_string())?;
    checkpoint::copy_into(vs, &ckpt.tensors, path, Some("fc."))
        .with_context(|| "key `finetune.from`".to_string())?;
    let probe = cfg.finetune.mode == crate::config::FinetuneMode::LinearProbe;
    if probe {
        for (name, mut v) in vs.variables() {
            if !name.starts_with("fc.") {
                let _ = v.requires_grad_(false);
            }
        }
    }
    log(&format!(
        "fine-tuning from {} ({}; new classifier)",
        path.display(),
        if probe {
            "linear probe, backbone frozen"
        } else {
            "all layers"
        }
    ));
    Ok(probe)
}

impl metrics::EpochRecord for EpochMetrics {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

/// Trains a model as the config says, writing everything into `opts.out_dir`.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    // Data-parallel: rank 0 writes the run folder and logs; every rank trains.
    let dist = opts.dist.clone();
    let rank0 = dist.as_ref().is_none_or(|g| g.rank == 0);
    let shard = dist.as_ref().map_or(Shard::SINGLE, |g| Shard {
        rank: g.rank,
        world: g.world_size,
    });
    let log = |m: &str| {
        if rank0 {
            (opts.log)(m)
        }
    };
    let device = opts.device;
    check_supported(cfg.train.precision, device)?;
    crate::device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);

    let out = &opts.out_dir;
    let ckpt_dir = out.join("checkpoints");
    let metrics_path = out.join("metrics.jsonl");
    if rank0 {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output folder {}", out.display()))?;
        std::fs::create_dir_all(&ckpt_dir)
            .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;
        checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())
            .with_context(|| format!("output folder {} is not writable", out.display()))?;
    }

    let (train_ds, val_ds) = data::open_train_val(&cfg.data, cfg.seed)?;
    let classes: Vec<String> = train_ds.classes().to_vec();
    let num_classes = if cfg.model.num_classes > 0 {
        cfg.model.num_classes
    } else {
        classes.len() as i64
    };
    if num_classes as usize != classes.len() {
        bail!(
            "key `model.num_classes` is {num_classes} but the dataset has {} classes",
            classes.len()
        );
    }
    // libtorch's generator is process-wide: runs started together (ablate --jobs N) would
    // interleave their draws, so seeding and initialisation happen under one lock.
    let (vs, net) = {
        let _guard = super::MODEL_INIT_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let net = Classifier::new(&vs.root(), &cfg.model, num_classes)?;
        (vs, net)
    };
    // `data.on_device`: both splits decoded once into device memory.
    let resident = if cfg.data.on_device {
        let t = Instant::now();
        let r = (
            Rc::new(Resident::load(&train_ds, &cfg.data, device)?),
            Rc::new(Resident::load(&val_ds, &cfg.data, device)?),
        );
        log(&format!(
            "data on {device:?}: {} + {} images decoded in {:.1}s",
            r.0.len(),
            r.1.len(),
            t.elapsed().as_secs_f64()
        ));
        Some(r)
    } else {
        None
    };
    let loader_cfg = cfg.data.for_device(device);
    let eval_batches = |bs: usize| match &resident {
        Some((_, val)) => Batches::Resident(val.eval_batches(bs, shard)),
        None => Batches::Loader(Loader::eval_shard(val_ds.clone(), &loader_cfg, bs, shard)),
    };
    let bs = cfg.train.batch_size;
    let iters_per_epoch = train_ds.len() / (bs * shard.world);
    if iters_per_epoch == 0 {
        bail!(
            "key `train.batch_size` ({bs}{}) is larger than the training set ({} images)",
            if shard.world > 1 {
                format!(" per rank × {} ranks", shard.world)
            } else {
                String::new()
            },
            train_ds.len()
        );
    }
    let probe = init_from_finetune(cfg, &vs, &log)?;
    let mut opt = Sgd::new(&vs, &cfg.optim);
    let epochs = cfg.train.epochs;
    if cfg.optim.lookahead {
        opt.set_lookahead(Lookahead::new(&vs, &cfg.optim, epochs * iters_per_epoch));
    }
    if !cfg.finetune.from.is_empty() && cfg.finetune.backbone_lr_mult != 1.0 {
        opt.set_lr_scale(
            |name| !name.starts_with("fc."),
            cfg.finetune.backbone_lr_mult,
        );
    }
    let mut state = TrainState {
        loss_scale: 1.0,
        ..Default::default()
    };
    let mut scaler = LossScaler::new(cfg.train.precision == Precision::Fp16, device);

    let resumed = if rank0 {
        resume_or_start::<EpochMetrics>(cfg, opts, &vs, &mut opt, &mut scaler, &mut state)?
    } else {
        false
    };
    // airbench94's whitening conv is set from the data at the start of a run (a resumed run has
    // it in its checkpoint; the other ranks of a data-parallel run get it from rank 0 below).
    let fresh_start = rank0 && !resumed && cfg.finetune.from.is_empty();
    if let (Classifier::Airbench(a), true) = (&net, fresh_start) {
        // From the decoded images already on the device when there are some (no second decode,
        // and the covariance is computed there).
        let t = Instant::now();
        let n = model::WHITEN_IMAGES;
        let images = match &resident {
            Some((train, _)) => first_images(train.eval_batches(500, Shard::SINGLE), n)?,
            None => first_images(Loader::eval(train_ds.clone(), &cfg.data, 500), n)?,
        };
        a.init_whitening(&images)
            .with_context(|| format!("whitening from {}", cfg.data.dir))?;
        if let Some(la) = opt.lookahead_mut() {
            la.restart_from_model();
        }
        log(&format!(
            "whitening conv set from the 2x2 patches of the first {} training images in {:.2}s",
            images.iter().map(|t| t.size()[0]).sum::<i64>(),
            t.elapsed().as_secs_f64()
        ));
    }
    if let Some(group) = &dist {
        sync_from_rank0(group, &vs, &mut opt, &mut state)?;
        scaler.restore(&state);
    }

    let channels_last = cfg.train.channels_last;
    if channels_last {
        weights_to_channels_last(&vs);
    }
    opt.flatten();
    let dp =
        match &dist {
            Some(group) => {
                let dp = DataParallel::new(group.clone(), &opt, &cfg.distributed)?;
                log(&format!(
                "data-parallel: {} ranks over {}, batch {bs} per rank = {} global, batch norm {}",
                dp.world_size(),
                if group.device.is_cuda() { "NCCL" } else { "Gloo" },
                bs * dp.world_size(),
                if dp.sync_bn() { "synchronised" } else { "per rank" }
            ));
                Some(dp)
            }
            None => None,
        };
    let teacher = if cfg.distill.teacher.is_empty() {
        None
    } else {
        Some(load_teacher(
            Path::new(&cfg.distill.teacher),
            device,
            num_classes,
            channels_last,
        )?)
    };

    let schedule = LrSchedule::new(
        &cfg.optim,
        super::schedule::peak_lr(&cfg.optim, cfg.train.batch_size, shard.world),
        iters_per_epoch,
        epochs,
    );
    let precision = cfg.train.precision;
    let read_every = EpochSums::read_every(device, dp.is_some());
    let mut stopped_early = false;
    let mut last_eval: Option<EvalResult> = None;
    let mut last_ips = 0.0;
    let (mut ips_images, mut ips_seconds) = (0usize, 0.0f64);

    // Validation over every rank's shard of the split, the sums gathered before the ratios.
    let eval_settings = EvalSettings {
        device,
        precision,
        channels_last,
        flip: cfg.train.eval_flip,
        translate: cfg.train.eval_translate,
    };
    let validate = || -> Result<EvalResult> {
        EvalSums::over(&net, eval_batches(bs), eval_settings)?
            .all_ranks(dp.as_ref())?
            .result()
    };
    if cfg.train.untimed_warmup && state.epochs_done < epochs {
        if dp.is_some() {
            log("train.untimed_warmup: skipped in a data-parallel run");
        } else {
            let t = Instant::now();
            let val_len = match &resident {
                Some((_, val)) => val.len(),
                None => val_ds.len(),
            };
            let eval = eval_batches(bs)
                .next()
                .ok_or_else(|| anyhow!("the evaluation split has no images"))??;
            // The CPU loader augments on the host: nothing of its to warm on the device. From
            // the device, the epoch's last batch: the draws of one batch, not of the epoch.
            let train_batch = match &resident {
                Some((train, _)) => train
                    .train_batches(bs, cfg.seed, 1, iters_per_epoch - 1, shard)
                    .next(),
                None => None,
            }
            .transpose()?;
            let step = WarmupStep {
                batch: train_batch.as_ref().unwrap_or(&eval),
                num_classes,
                lr: schedule.lr_at(state.global_step),
                cfg,
                ckpt_dir: &ckpt_dir,
            };
            untimed_warmup(
                &net,
                &vs,
                &mut opt,
                &mut scaler,
                step,
                &eval,
                val_len % bs,
                eval_settings,
            )?;
            log(&format!(
                "untimed warm-up (a training step and an evaluation pass, undone): {:.1}s",
                t.elapsed().as_secs_f64()
            ));
        }
    }
    // Checkpoints are written in the background; `finish` below waits for the last ones.
    let mut writer = checkpoint::Writer::new();
    for epoch in state.epochs_done + 1..=epochs {
        let epoch_start = Instant::now();
        // Resuming from an interrupt checkpoint continues the epoch at its next batch, with the
        // epoch's running sums, so the epoch's metrics come out as if never interrupted.
        // (In a data-parallel run the saved sums are over all ranks: rank 0 carries them.)
        let first_batch = std::mem::take(&mut state.batch_in_epoch);
        let whiten_bias_epochs = cfg.model.whiten_bias_epochs;
        if whiten_bias_epochs > 0 && epoch > whiten_bias_epochs {
            opt.freeze(|name| name == model::WHITEN_BIAS);
        }
        let partial = std::mem::take(&mut state.partial);
        let partial = if rank0 { partial } else { Default::default() };
        let loader = match &resident {
            Some((train, _)) => {
                Batches::Resident(train.train_batches(bs, cfg.seed, epoch, first_batch, shard))
            }
            None => Batches::Loader(Loader::train_shard(
                train_ds.clone(),
                &loader_cfg,
                bs,
                cfg.seed,
                epoch,
                first_batch,
                shard,
            )),
        };
        let bar = progress_bar(opts.progress, loader.num_batches() as u64, epoch, epochs);
        bar.set_position(first_batch as u64);
        let use_mixup = cfg.mixup.alpha > 0.0 && epoch + cfg.mixup.off_epochs <= epochs;
        let mut sums = EpochSums::new(
            partial.loss_sum,
            partial.correct,
            device,
            read_every,
            scaler.enabled,
            &ckpt_dir,
        );
        let (mut seen, mut skipped) = (partial.seen, partial.skipped);
        let mut lr = schedule.lr_at(state.global_step);
        let train_start = Instant::now();
        let mut steps_done = first_batch;
        let mut data_wait = 0.0;
        let mut loader = loader.enumerate();
        loop {
            let asked = Instant::now();
            let Some((i, batch)) = loader.next() else {
                break;
            };
            data_wait += asked.elapsed().as_secs_f64();
            let step_in_epoch = first_batch + i;
            let batch = batch?;
            skipped += batch.skipped;
            let b = batch.labels.size()[0];
            if b == 0 {
                continue;
            }
            lr = schedule.lr_at(state.global_step);
            let x = to_device_input(&batch.images, device, channels_last);
            let y = upload(&batch.labels, device);
            let eps = cfg.loss.label_smoothing;
            // Target distributions only where the loss needs them (mixup mixes them, the
            // distillation loss takes them); hard labels otherwise, for the fused cross entropy.
            let mut targets =
                (use_mixup || teacher.is_some()).then(|| smooth_targets(&y, num_classes, eps));
            let mut inputs = x;
            if let (true, Some(q)) = (use_mixup, &targets) {
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
                    cfg.seed,
                    "mixup",
                    epoch as u64,
                    step_in_epoch as u64,
                ));
                let lambda = mixup::sample_lambda(&mut rng, cfg.mixup.alpha);
                let perm = mixup::permutation(&mut rng, b as usize);
                let (mx, my) = mixup::mixup(&inputs, q, lambda, &perm);
                inputs = mx;
                targets = Some(my);
            }
            let (logits, loss) = {
                let _ac = Autocast::enter(precision, device);
                let logits = if probe {
                    // Linear probe: the frozen backbone runs with its BN in eval mode.
                    net.classify(&tch::no_grad(|| net.features(&inputs, false)))
                } else {
                    net.forward_t(&inputs, true)
                };
                let loss = match (&teacher, &targets) {
                    (Some(t), Some(q)) => {
                        let r = tch::no_grad(|| t.model.forward_t(&inputs, false));
                        distillation_loss(
                            &logits,
                            &r,
                            q,
                            cfg.distill.temperature,
                            cfg.distill.hard_weight,
                            cfg.distill.soft_weight,
                        )
                    }
                    (None, Some(q)) => soft_cross_entropy(&logits, q),
                    (None, None) => smoothed_cross_entropy(&logits, &y, num_classes, eps),
                    (Some(_), None) => unreachable!("a teacher always gets target distributions"),
                };
                (logits, loss)
            };
            let at = StepPosition {
                epoch,
                step_in_epoch,
                global_step: state.global_step,
            };
            let step = optimizer_step(
                &loss,
                &mut opt,
                &mut scaler,
                &cfg.optim,
                lr,
                &ckpt_dir,
                at,
                dp.as_ref(),
                opts.stop.load(Ordering::SeqCst),
                sums.reads_every_step(),
            )?;
            let hits = top1_hits(&logits, &y);
            let current = sums.add(&step.loss, &hits, b, state.global_step)?;
            state.global_step += 1;
            if let Some(la) = opt.lookahead_mut() {
                la.after_step(state.global_step);
            }
            seen += b as usize;
            if current {
                let ips = seen as f64 / train_start.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.4} acc {:.2}% lr {:.4} {:.0} img/s",
                    sums.loss / seen as f64,
                    100.0 * sums.correct as f64 / seen as f64,
                    lr,
                    ips
                ));
            }
            bar.inc(1);
            steps_done = step_in_epoch + 1;
            let signalled = step.stop;
            let step_limit = cfg.train.max_steps > 0 && state.global_step >= cfg.train.max_steps;
            if (signalled || step_limit) && steps_done < iters_per_epoch {
                stopped_early = true;
                break;
            }
            if signalled || step_limit {
                stopped_early = true; // the epoch is complete: finish it normally below
            }
        }
        bar.finish_and_clear();
        sums.read()?;
        let (mut loss_sum, mut correct) = (sums.loss, sums.correct);
        if let Some(dp) = &dp {
            let v = dp.sum(&[loss_sum, correct as f64, seen as f64, skipped as f64])?;
            (loss_sum, correct, seen, skipped) = (v[0], v[1] as i64, v[2] as usize, v[3] as usize);
        }
        if seen == 0 {
            bail!("epoch {epoch}: no usable training images (every image of the epoch failed to load)");
        }
        state.train_seconds += train_start.elapsed().as_secs_f64();
        if stopped_early && steps_done < iters_per_epoch {
            // Mid-epoch stop: save where the epoch stands; `--resume` continues at the next batch.
            state.epochs_done = epoch - 1;
            state.batch_in_epoch = steps_done;
            state.partial = checkpoint::EpochProgress {
                loss_sum,
                correct,
                seen,
                skipped,
            };
            scaler.record(&mut state);
            let path = ckpt_dir.join(checkpoint::INTERRUPT_FILE);
            if let Some(dp) = &dp {
                dp.broadcast_buffers(&vs)?;
            }
            if rank0 {
                writer.submit(training_checkpoint(&path, &vs, &opt, cfg, &classes, &state))?;
            }
            log(&format!(
                "stopped at epoch {epoch}, step {steps_done}/{iters_per_epoch}: checkpoint written to {}; continue with --resume",
                path.display()
            ));
            break;
        }
        let train_seconds = train_start.elapsed().as_secs_f64();
        last_ips = seen as f64 / train_seconds.max(1e-9);
        ips_images += seen;
        ips_seconds += train_seconds;

        if let Some(dp) = &dp {
            dp.broadcast_buffers(&vs)?;
            dp.check_replicas(&vs)?;
        }
        let is_last = epoch == epochs || stopped_early;
        let eval_start = Instant::now();
        let eval = if epoch % cfg.train.eval_every == 0 || is_last {
            Some(validate()?)
        } else {
            None
        };
        let eval_seconds = eval_start.elapsed().as_secs_f64();
        if let Some(e) = eval {
            last_eval = Some(e);
            if e.top1 > state.best_top1 || state.best_epoch == 0 {
                state.best_top1 = e.top1;
                state.best_epoch = epoch;
                if rank0 {
                    save_weights(&writer, &out.join("best.safetensors"), &vs, cfg, &classes)?;
                }
            }
        }
        let m = EpochMetrics {
            epoch,
            lr,
            train_loss: loss_sum / seen as f64,
            train_top1: 100.0 * correct as f64 / seen as f64,
            val_loss: eval.map(|e| e.loss),
            val_top1: eval.map(|e| e.top1),
            val_top5: eval.map(|e| e.top5),
            images_per_second: last_ips,
            seconds: epoch_start.elapsed().as_secs_f64(),
            skipped_images: skipped,
            data_wait_seconds: data_wait,
            eval_seconds,
        };
        state.epochs_done = epoch;
        scaler.record(&mut state);
        if rank0 {
            metrics::append(&metrics_path, &m)?;
            log(&format_epoch(&m, epochs));
            save_epoch_checkpoint(&writer, &ckpt_dir, epoch, &vs, &opt, cfg, &classes, &state)?;
        }
        if stopped_early {
            break;
        }
    }

    let final_eval = match last_eval {
        Some(e) => e,
        None => validate()?,
    };
    if let Some(dp) = &dp {
        dump_rank_weights(dp.rank(), &vs)?;
    }
    let summary = RunSummary {
        epochs: state.epochs_done,
        best_top1: state.best_top1,
        best_epoch: state.best_epoch,
        final_top1: final_eval.top1,
        final_top5: final_eval.top5,
        final_val_loss: final_eval.loss,
        train_seconds: state.train_seconds,
        images_per_second: if ips_seconds > 0.0 {
            ips_images as f64 / ips_seconds
        } else {
            last_ips
        },
        stopped_early,
    };
    writer.finish()?;
    if !stopped_early && rank0 {
        checkpoint::write_atomic(
            &out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(summary)
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

/// Starts or resumes the run in `opts.out_dir`, for every task. With `opts.resume`: restores
/// weights, momentum, training state and loss scaler from the newest valid checkpoint (the config
/// must be the one the run started with) and drops metrics lines of epochs it does not cover.
/// Without: refuses a folder that already holds a run's checkpoints. A run that starts from
/// scratch begins with no metrics. Returns whether it resumed.
pub(crate) fn resume_or_start<M: metrics::EpochRecord>(
    cfg: &Config,
    opts: &RunOptions,
    vs: &nn::VarStore,
    opt: &mut Sgd,
    scaler: &mut LossScaler,
    state: &mut TrainState,
) -> Result<bool> {
    let out = &opts.out_dir;
    let ckpt_dir = out.join("checkpoints");
    let metrics_path = out.join("metrics.jsonl");
    if opts.resume {
        let mut warn = |m: String| (opts.log)(&format!("warning: {m}"));
        if let Some(ck) = checkpoint::latest_valid(&ckpt_dir, &mut warn) {
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
            metrics::truncate::<M>(&metrics_path, state.epochs_done)?;
            (opts.log)(&format!(
                "resuming from {} (epoch {} done, step {})",
                ck.path.display(),
                state.epochs_done,
                state.global_step
            ));
            return Ok(true);
        }
        (opts.log)("no checkpoint to resume from: starting from scratch");
    } else if !checkpoint::list_epoch_checkpoints(&ckpt_dir).is_empty()
        || ckpt_dir.join(checkpoint::INTERRUPT_FILE).exists()
    {
        bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    if metrics_path.exists() {
        std::fs::remove_file(&metrics_path)
            .with_context(|| format!("cannot remove the old {}", metrics_path.display()))?;
    }
    Ok(false)
}

/// Where a step sits in the run (for error messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepPosition {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub global_step: usize,
}

/// What [`optimizer_step`] reports.
pub(crate) struct StepOutcome {
    /// This process's loss, detached, on the device (not read back).
    pub loss: Tensor,
    /// Stop after this step: a stop was requested here or, in a data-parallel run, on any rank.
    pub stop: bool,
}

/// One optimisation step on a computed loss, shared by every task: stop on a non-finite loss
/// (naming the step and the last good checkpoint), backward through the loss scaler (averaging
/// gradients over ranks in a data-parallel run), skip the step on inf/NaN gradients (f16), clip,
/// SGD step. Data-parallel ranks agree first on the loss being finite and on stopping, so that
/// they all take, or all refuse, the same step.
///
/// `check_loss = false` skips reading the loss back before the step (single process only): on a
/// GPU that read makes the host wait for the queue to drain at every step, so the classification
/// trainer reads its summed loss every few steps instead and stops there ([`EpochSums`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimizer_step(
    loss: &Tensor,
    opt: &mut Sgd,
    scaler: &mut LossScaler,
    optim: &crate::config::OptimConfig,
    lr: f64,
    ckpt_dir: &Path,
    at: StepPosition,
    dp: Option<&DataParallel>,
    stop_requested: bool,
    check_loss: bool,
) -> Result<StepOutcome> {
    let mut stop = stop_requested;
    if check_loss || dp.is_some() {
        let local_loss = f64::try_from(loss)?;
        let loss_value = match dp {
            Some(dp) => {
                let v = dp.sum(&[local_loss, f64::from(u8::from(stop_requested))])?;
                stop = v[1] > 0.0;
                v[0] / dp.world_size() as f64
            }
            None => local_loss,
        };
        if !loss_value.is_finite() && !scaler.enabled {
            let place = format!(
                "at epoch {}, step {} (global step {})",
                at.epoch,
                at.step_in_epoch + 1,
                at.global_step + 1
            );
            return Err(non_finite_loss(loss_value, &place, ckpt_dir));
        }
    }
    opt.zero_grad();
    if let Some(dp) = dp {
        dp.before_backward()?;
    }
    scaler.scale_loss(loss).f_backward().map_err(|e| {
        let msg = format!(
            "the backward pass failed at epoch {}, step {}: {e}",
            at.epoch,
            at.step_in_epoch + 1
        );
        match dp {
            // The gradient all-reduce runs inside the backward pass.
            Some(_) => anyhow!("{msg} (another rank has probably stopped or died: see its output)"),
            None => anyhow!(msg),
        }
    })?;
    let grads = opt.gradients();
    // With f16 loss scaling, 1 on the device where a gradient is inf or NaN: the step is skipped
    // there (clipping such gradients makes NaNs, which the skipped step never reads).
    let found_inf = scaler.unscale(&grads);
    if optim.clip_grad_value > 0.0 {
        clip::clip_grad_value(&grads, optim.clip_grad_value);
    }
    if optim.clip_grad_norm > 0.0 {
        let _ = clip::clip_grad_norm(&grads, optim.clip_grad_norm);
    }
    opt.step_unless(lr, found_inf.as_ref());
    if let Some(found_inf) = &found_inf {
        scaler.update(found_inf);
    }
    Ok(StepOutcome {
        loss: loss.detach(),
        stop,
    })
}

/// The error for a NaN or infinite training loss, naming where it was seen and the checkpoint to
/// go back to.
fn non_finite_loss(value: f64, place: &str, ckpt_dir: &Path) -> anyhow::Error {
    let last = checkpoint::list_epoch_checkpoints(ckpt_dir)
        .first()
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_else(|| "none yet".into());
    anyhow!(
        "the loss became {value} {place}; training stopped, the last good checkpoint is {last} (lower optim.lr, or enable optim.clip_grad_norm)"
    )
}

/// Steps between reads of the running loss on a single GPU: the progress line's refresh, and the
/// most steps a NaN loss (without a loss scaler) goes unnoticed before training stops.
const GPU_READ_EVERY: usize = 25;

/// The training loss and top-1 sums of an epoch. What each step adds stays on the device and is
/// read back every `read_every` steps: a read makes a GPU wait until its queue has drained,
/// which at every step would serialise the host's kernel launches with the GPU's work. On a CPU
/// a read costs nothing and `read_every` is 1.
pub(crate) struct EpochSums {
    pub(crate) loss: f64,
    pub(crate) correct: i64,
    /// Non-finite losses are expected (an f16 loss scaler skips those steps), not an error.
    loss_may_be_inf: bool,
    /// Where the error for a non-finite loss finds the last good checkpoint.
    ckpt_dir: PathBuf,
    pending_loss: Tensor,
    pending_correct: Tensor,
    /// Global steps whose sums are pending: from `pending_from`, `pending_steps` of them.
    pending_from: usize,
    pending_steps: usize,
    read_every: usize,
}

impl EpochSums {
    /// How often the sums are read back: every step on a CPU, where a read is free, and in a
    /// data-parallel run, whose ranks agree on the loss at every step anyway; else every
    /// [`GPU_READ_EVERY`] steps.
    pub(crate) fn read_every(device: Device, data_parallel: bool) -> usize {
        if device.is_cuda() && !data_parallel {
            GPU_READ_EVERY
        } else {
            1
        }
    }

    pub(crate) fn new(
        loss: f64,
        correct: i64,
        device: Device,
        read_every: usize,
        loss_may_be_inf: bool,
        ckpt_dir: &Path,
    ) -> EpochSums {
        EpochSums {
            loss,
            correct,
            loss_may_be_inf,
            ckpt_dir: ckpt_dir.to_path_buf(),
            pending_loss: Tensor::zeros([], (Kind::Double, device)),
            pending_correct: Tensor::zeros([], (Kind::Int64, device)),
            pending_from: 0,
            pending_steps: 0,
            read_every,
        }
    }

    /// Whether every step is read back: then the optimizer step checks the loss itself, before
    /// applying a NaN step.
    pub(crate) fn reads_every_step(&self) -> bool {
        self.read_every == 1
    }

    /// Adds a step's mean loss (times its batch size) and hits (top-1 hits; correct pixels in
    /// segmentation); returns true when the sums were read back, i.e. the running figures are
    /// current.
    pub(crate) fn add(
        &mut self,
        loss: &Tensor,
        hits: &Tensor,
        batch: i64,
        global_step: usize,
    ) -> Result<bool> {
        if self.pending_steps == 0 {
            self.pending_from = global_step;
        }
        self.pending_loss += loss.to_kind(Kind::Double) * batch as f64;
        self.pending_correct += hits;
        self.pending_steps += 1;
        if self.pending_steps < self.read_every {
            return Ok(false);
        }
        self.read()?;
        Ok(true)
    }

    /// Reads the pending sums back. Without a loss scaler (which skips inf/NaN steps itself) a
    /// non-finite sum stops training, naming the steps it came from.
    pub(crate) fn read(&mut self) -> Result<()> {
        if self.pending_steps == 0 {
            return Ok(());
        }
        let loss = f64::try_from(&self.pending_loss)?;
        if !loss.is_finite() && !self.loss_may_be_inf {
            let (a, b) = (
                self.pending_from + 1,
                self.pending_from + self.pending_steps,
            );
            let place = if a == b {
                format!("at global step {a}")
            } else {
                format!("within global steps {a}–{b}")
            };
            return Err(non_finite_loss(loss, &place, &self.ckpt_dir));
        }
        self.loss += loss;
        self.correct += self.pending_correct.int64_value(&[]);
        let _ = self.pending_loss.zero_();
        let _ = self.pending_correct.zero_();
        self.pending_steps = 0;
        Ok(())
    }
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

/// The checkpoint of a finished epoch; once it is written, older ones beyond
/// `train.keep_checkpoints` and the epoch's interrupt checkpoint (now stale) are removed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_epoch_checkpoint(
    writer: &checkpoint::Writer,
    ckpt_dir: &Path,
    epoch: usize,
    vs: &nn::VarStore,
    opt: &Sgd,
    cfg: &Config,
    classes: &[String],
    state: &TrainState,
) -> Result<()> {
    let path = checkpoint::epoch_checkpoint_path(ckpt_dir, epoch);
    let write = training_checkpoint(&path, vs, opt, cfg, classes, state);
    let (dir, keep) = (ckpt_dir.to_path_buf(), cfg.train.keep_checkpoints);
    writer.submit(move || {
        write()?;
        checkpoint::prune(&dir, keep);
        let _ = std::fs::remove_file(dir.join(checkpoint::INTERRUPT_FILE));
        Ok(())
    })
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

fn format_epoch(m: &EpochMetrics, epochs: usize) -> String {
    let val = match (m.val_top1, m.val_top5, m.val_loss) {
        (Some(t1), Some(t5), Some(l)) => {
            format!(" | val loss {l:.4} top-1 {t1:.2}% top-5 {t5:.2}%")
        }
        _ => String::new(),
    };
    format!(
        "epoch {}/{epochs}: lr {:.5} train loss {:.4} top-1 {:.2}%{val} | {:.0} img/s, {:.1}s (data wait {:.1}s){}",
        m.epoch,
        m.lr,
        m.train_loss,
        m.train_top1,
        m.images_per_second,
        m.seconds,
        m.data_wait_seconds,
        if m.skipped_images > 0 {
            format!(", {} bad images skipped", m.skipped_images)
        } else {
            String::new()
        }
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(v: f32) -> Tensor {
        Tensor::from(v)
    }

    /// The trainer's step with f16 loss scaling (in f32 here: the scaler does not care): a
    /// finite step moves the weights by the unscaled gradient; an infinite loss is skipped on the
    /// device, leaving weights and momentum as they were, and halves the scale.
    #[test]
    fn loss_scaled_steps_unscale_and_skip_infinite_ones() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0]));
        let optim = crate::config::OptimConfig {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = Sgd::new(&vs, &optim);
        opt.flatten();
        let mut scaler = LossScaler::new(true, Device::Cpu);
        let dir = tempfile::tempdir().unwrap();
        let step = |opt: &mut Sgd, scaler: &mut LossScaler, loss: Tensor, global_step: usize| {
            let at = StepPosition {
                epoch: 1,
                step_in_epoch: global_step,
                global_step,
            };
            optimizer_step(
                &loss,
                opt,
                scaler,
                &optim,
                0.1,
                dir.path(),
                at,
                None,
                false,
                false,
            )
            .unwrap()
        };
        // d(w·w)/dw = 2w; first step of momentum: b = g, w -= 0.1·g.
        step(&mut opt, &mut scaler, (&w * &w).sum(Kind::Float), 0);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![0.8, 1.6]);
        let momentum = opt.state_tensors()[0].1.copy();
        let infinite = (&w * f64::INFINITY).sum(Kind::Float);
        let outcome = step(&mut opt, &mut scaler, infinite, 1);
        assert!(f64::try_from(&outcome.loss).unwrap().is_infinite());
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![0.8, 1.6]);
        assert!(opt.state_tensors()[0].1.equal(&momentum));
        assert_eq!(scaler.scale(), 32768.0);
        assert_eq!(scaler.good_steps(), 0);
    }

    #[test]
    fn flip_evaluation_scores_the_mean_logits_of_each_image_and_its_mirror() {
        let spec = crate::model::ModelSpec::from_config(&crate::config::ModelConfig {
            name: "cifar_resnet8".into(),
            ..Default::default()
        })
        .unwrap();
        tch::manual_seed(3);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = Classifier::ResNet(crate::model::ResNet::new(&vs.root(), &spec, 5));
        // Not square, so that flipping the wrong axis would give other logits.
        let x = Tensor::randn([6, 3, 8, 12], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
        let eval = |flip: bool, translate: bool| {
            let batch = Batch {
                images: x.shallow_clone(),
                labels: y.shallow_clone(),
                skipped: 0,
            };
            let settings = EvalSettings {
                device: Device::Cpu,
                precision: Precision::Fp32,
                channels_last: false,
                flip,
                translate,
            };
            evaluate(&net, std::iter::once(Ok(batch)), settings).unwrap()
        };
        let mirrored =
            tch::no_grad(|| (net.forward_t(&x, false) + net.forward_t(&x.flip([3]), false)) * 0.5);
        let expected_loss = mirrored.cross_entropy_for_logits(&y).double_value(&[]);
        let expected_top1 = 100.0
            * mirrored
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .double_value(&[])
            / 6.0;
        let with_flip = eval(true, false);
        assert!(
            (with_flip.loss - expected_loss).abs() < 1e-6,
            "{with_flip:?} vs {expected_loss}"
        );
        assert_eq!(with_flip.top1, expected_top1);
        assert_eq!(with_flip.samples, 6);
        let plain = eval(false, false);
        let plain_loss = tch::no_grad(|| net.forward_t(&x, false))
            .cross_entropy_for_logits(&y)
            .double_value(&[]);
        assert!((plain.loss - plain_loss).abs() < 1e-6);
        assert!(
            (plain.loss - with_flip.loss).abs() > 1e-4,
            "the flip changed nothing"
        );
        // Translation: ½ the (mirror-averaged) logits plus ¼ each of the image shifted by one
        // pixel up-left and down-right, its border mirrored: built here by indexing.
        let shifted = |d: i64| {
            let pick = |n: i64| {
                let idx: Vec<i64> = (0..n)
                    .map(|i| (i + d).abs().min(2 * (n - 1) - (i + d)))
                    .collect();
                Tensor::from_slice(&idx)
            };
            x.index_select(2, &pick(8)).index_select(3, &pick(12))
        };
        let views = |x: &Tensor| {
            tch::no_grad(|| (net.forward_t(x, false) + net.forward_t(&x.flip([3]), false)) * 0.5)
        };
        let translated = &mirrored * 0.5 + (views(&shifted(-1)) + views(&shifted(1))) * 0.25;
        let expected = translated.cross_entropy_for_logits(&y).double_value(&[]);
        let with_translate = eval(true, true);
        assert!(
            (with_translate.loss - expected).abs() < 1e-5,
            "{with_translate:?} vs {expected}"
        );
        assert!((with_translate.loss - with_flip.loss).abs() > 1e-4);
    }

    #[test]
    fn epoch_sums_are_read_every_n_steps_and_carry_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EpochSums::new(10.0, 7, Device::Cpu, 3, false, dir.path());
        let hits = Tensor::from(2i64);
        assert!(!s.add(&scalar(1.5), &hits, 4, 0).unwrap());
        assert!(!s.add(&scalar(0.5), &hits, 4, 1).unwrap());
        // Nothing read yet: the running figures are still those carried in.
        assert_eq!((s.loss, s.correct), (10.0, 7));
        assert!(s.add(&scalar(1.0), &hits, 2, 2).unwrap());
        assert_eq!((s.loss, s.correct), (10.0 + 6.0 + 2.0 + 2.0, 7 + 6));
        // A partial window is read at the epoch's end.
        assert!(!s.add(&scalar(0.25), &hits, 4, 3).unwrap());
        s.read().unwrap();
        assert_eq!((s.loss, s.correct), (21.0, 15));
        s.read().unwrap(); // nothing pending: unchanged
        assert_eq!((s.loss, s.correct), (21.0, 15));
    }

    #[test]
    fn a_non_finite_loss_is_an_error_naming_its_steps_unless_a_scaler_skips_them() {
        let dir = tempfile::tempdir().unwrap();
        let hits = Tensor::from(0i64);
        let mut s = EpochSums::new(0.0, 0, Device::Cpu, 4, false, dir.path());
        for (step, v) in [(10, 1.0), (11, f32::NAN), (12, 1.0)] {
            assert!(!s.add(&scalar(v), &hits, 2, step).unwrap());
        }
        let e = s.add(&scalar(1.0), &hits, 2, 13).unwrap_err().to_string();
        assert!(
            e.contains("loss became NaN within global steps 11–14"),
            "{e}"
        );
        assert!(e.contains("last good checkpoint is none yet"), "{e}");
        // With f16 loss scaling a NaN step is skipped by the scaler, not fatal.
        let mut s = EpochSums::new(0.0, 0, Device::Cpu, 1, true, dir.path());
        assert!(s.add(&scalar(f32::INFINITY), &hits, 2, 0).unwrap());
        let e = EpochSums::new(0.0, 0, Device::Cpu, 1, false, dir.path())
            .add(&scalar(f32::INFINITY), &hits, 2, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loss became inf at global step 5"), "{e}");
    }
}
