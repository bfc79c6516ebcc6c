//! One segmentation training run, built from the classification run's parts: [`Sgd`] (with a
//! per-parameter lr scale for `segment.backbone_lr_mult`), [`LrSchedule`] (warmup, step or
//! cosine), autocast and loss scaling, gradient clipping, and the same checkpoints, resume and
//! output files (`config.toml`, `metrics.jsonl`, `checkpoints/epoch-NNNN.safetensors`,
//! `best.safetensors`, `summary.json`).
//!
//! The loss is the pixel-wise cross entropy averaged over the labelled pixels of the batch (void
//! pixels, `segment.ignore_index`, count nowhere). "Best" is the epoch with the highest val mIoU.
//! So that `tricks ablate` / `report` read a segmentation run unchanged, each metrics line and
//! the summary also carry the classification field names: `val_top1` / `best_top1` /
//! `final_top1` = mIoU, `val_top5` / `final_top5` = pixel accuracy, `train_top1` = training
//! pixel accuracy (all in %).

use super::dataset;
use super::loader::SegLoader;
use super::metrics::{batch_counts, ConfusionMatrix};
use super::model::{load_backbone, SegModel, HEAD_PREFIX};
use crate::checkpoint::{self, TrainState};
use crate::config::{Config, Precision, Task};
use crate::device::weights_to_channels_last;
use crate::metrics;
use crate::train::optim::Sgd;
use crate::train::precision::{check_supported, Autocast, LossScaler};
use crate::train::schedule::LrSchedule;
use crate::train::{
    derive_seed, optimizer_step, progress_bar, resume_or_start, save_epoch_checkpoint,
    save_weights, to_device_input, training_checkpoint, EpochSums, RunOptions, RunSummary,
    StepPosition,
};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Reduction, Tensor};

/// One line of a segmentation run's `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegEpochMetrics {
    pub epoch: usize,
    /// Learning rate (of the head) at the last step of the epoch.
    pub lr: f64,
    /// Mean pixel cross entropy of the epoch's training batches.
    pub train_loss: f64,
    /// Training pixel accuracy (%) on the augmented crops.
    pub train_top1: f64,
    pub val_loss: Option<f64>,
    /// Validation pixel accuracy (%).
    pub pixel_acc: Option<f64>,
    /// Validation mean IoU (%).
    pub miou: Option<f64>,
    /// = `miou`, under the classification name `tricks ablate` reads.
    pub val_top1: Option<f64>,
    /// = `pixel_acc`, under the classification name `tricks ablate` reads.
    pub val_top5: Option<f64>,
    /// Training throughput (loading + augmentation + training, no evaluation).
    pub images_per_second: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
}

/// What a finished segmentation run reports (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegSummary {
    pub epochs: usize,
    /// Highest validation mIoU (%) and its epoch, with that epoch's pixel accuracy.
    pub best_miou: f64,
    pub best_epoch: usize,
    pub best_pixel_acc: f64,
    pub final_miou: f64,
    pub final_pixel_acc: f64,
    pub final_val_loss: f64,
    pub train_seconds: f64,
    pub images_per_second: f64,
    pub stopped_early: bool,
    /// = `best_miou` / `final_miou` / `final_pixel_acc` under the classification names, so that
    /// the file also reads as a [`RunSummary`].
    pub best_top1: f64,
    pub final_top1: f64,
    pub final_top5: f64,
}

impl SegSummary {
    /// The summary as the classification tools (`tricks ablate`, `report`) see it: top-1 = mIoU,
    /// top-5 = pixel accuracy.
    pub fn to_run_summary(&self) -> RunSummary {
        RunSummary {
            epochs: self.epochs,
            best_top1: self.best_miou,
            best_epoch: self.best_epoch,
            final_top1: self.final_miou,
            final_top5: self.final_pixel_acc,
            final_val_loss: self.final_val_loss,
            train_seconds: self.train_seconds,
            images_per_second: self.images_per_second,
            stopped_early: self.stopped_early,
        }
    }
}

/// The evaluation of a segmentation model over a whole split.
#[derive(Debug, Clone, PartialEq)]
pub struct SegEval {
    /// Mean cross entropy over the labelled pixels.
    pub loss: f64,
    /// Pixel accuracy and mean IoU (%), from the confusion matrix of the whole split.
    pub pixel_acc: f64,
    pub miou: f64,
    /// Per-class IoU (%); `None` for classes absent from both ground truth and prediction.
    pub iou: Vec<Option<f64>>,
    pub confusion: ConfusionMatrix,
    pub images: usize,
}

/// Summed pixel cross entropy over the labelled pixels (computed in f32).
fn pixel_ce_sum(logits: &Tensor, masks: &Tensor, ignore: i64) -> Tensor {
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        masks,
        None,
        Reduction::Sum,
        ignore,
        0.0,
    )
}

/// Labelled (non-void) pixels of a mask batch.
fn labelled(masks: &Tensor, ignore: i64) -> i64 {
    masks.ne(ignore).sum(Kind::Int64).int64_value(&[])
}

/// Loss, pixel accuracy and mIoU of a model over a loader.
pub fn evaluate(
    model: &SegModel,
    loader: SegLoader,
    device: Device,
    precision: Precision,
    channels_last: bool,
    ignore: i64,
) -> Result<SegEval> {
    let k = model.num_classes;
    // The sums stay on the device until the end: a read per batch would stall a GPU's queue.
    let mut counts = Tensor::zeros([k * k], (Kind::Int64, device));
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let (mut pixels, mut images) = (0i64, 0usize);
    for batch in loader {
        let batch = batch?;
        let x = to_device_input(&batch.images, device, channels_last);
        let y = crate::device::upload(&batch.masks, device);
        let logits = tch::no_grad(|| {
            let _ac = Autocast::enter(precision, device);
            model.forward_t(&x, false)
        })
        .to_kind(Kind::Float);
        loss_sum += tch::no_grad(|| pixel_ce_sum(&logits, &y, ignore)).to_kind(Kind::Double);
        pixels += labelled(&batch.masks, ignore);
        counts += batch_counts(&y, &logits.argmax(1, false), k);
        images += batch.len();
    }
    if images == 0 {
        bail!("the evaluation split has no images");
    }
    let mut cm = ConfusionMatrix::new(k as usize);
    cm.add_counts(&counts);
    Ok(SegEval {
        loss: f64::try_from(&loss_sum)? / pixels.max(1) as f64,
        pixel_acc: cm.pixel_accuracy(),
        miou: cm.mean_iou(),
        iou: cm.iou(),
        confusion: cm,
        images,
    })
}

impl metrics::EpochRecord for SegEpochMetrics {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

/// Reads a segmentation run's `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<SegEpochMetrics>> {
    metrics::read(path)
}

fn format_epoch(m: &SegEpochMetrics, epochs: usize) -> String {
    let val = match (m.val_loss, m.pixel_acc, m.miou) {
        (Some(l), Some(a), Some(iou)) => {
            format!(" | val loss {l:.4} pixel acc {a:.2}% mIoU {iou:.2}%")
        }
        _ => String::new(),
    };
    format!(
        "epoch {}/{epochs}: lr {:.5} train loss {:.4} pixel acc {:.2}%{val} | {:.1} img/s, {:.1}s",
        m.epoch, m.lr, m.train_loss, m.train_top1, m.images_per_second, m.seconds
    )
}

/// Trains an FCN as the config says (`task = "segmentation"`), writing everything into
/// `opts.out_dir`; `opts.resume` continues from the newest valid checkpoint there.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<SegSummary> {
    if cfg.task != Task::Segmentation {
        bail!("segment::train needs a config with task = \"segmentation\"");
    }
    let log = |m: &str| (opts.log)(m);
    let device = opts.device;
    check_supported(cfg.train.precision, device)?;
    crate::device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);

    let out = &opts.out_dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let ckpt_dir = out.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())
        .with_context(|| format!("output folder {} is not writable", out.display()))?;

    let (train_ds, val_ds) = dataset::open_train_val(cfg)?;
    let classes = super::class_names(cfg);
    let ignore = cfg.segment.ignore_index;
    let (vs, net) = {
        let _guard = crate::train::MODEL_INIT_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(device);
        let net = SegModel::new(&vs.root(), cfg)?;
        (vs, net)
    };
    let mut opt = Sgd::new(&vs, &cfg.optim);
    if cfg.segment.backbone_lr_mult != 1.0 {
        opt.set_lr_scale(
            |name| !name.starts_with(HEAD_PREFIX),
            cfg.segment.backbone_lr_mult,
        );
    }
    let mut state = TrainState {
        loss_scale: 1.0,
        ..Default::default()
    };
    let mut scaler = LossScaler::new(cfg.train.precision == Precision::Fp16, device);

    let resumed =
        resume_or_start::<SegEpochMetrics>(cfg, opts, &vs, &mut opt, &mut scaler, &mut state)?;
    if !resumed {
        load_backbone(&vs, cfg)?;
        if !cfg.segment.backbone.is_empty() {
            log(&format!(
                "backbone initialised from {}; the head starts at random",
                cfg.segment.backbone
            ));
        }
    }

    let channels_last = cfg.train.channels_last;
    if channels_last {
        weights_to_channels_last(&vs);
    }
    opt.flatten();
    let bs = cfg.train.batch_size;
    let iters_per_epoch = train_ds.len() / bs;
    if iters_per_epoch == 0 {
        bail!(
            "key `train.batch_size` ({bs}) is larger than the training set ({} images)",
            train_ds.len()
        );
    }
    let epochs = cfg.train.epochs;
    let schedule = LrSchedule::new(
        &cfg.optim,
        crate::train::schedule::peak_lr(&cfg.optim, cfg.train.batch_size, 1),
        iters_per_epoch,
        epochs,
    );
    let precision = cfg.train.precision;
    let read_every = EpochSums::read_every(device, false);
    let mut stopped_early = false;
    let mut last_eval: Option<SegEval> = None;
    let mut last_ips = 0.0;
    let (mut ips_images, mut ips_seconds) = (0usize, 0.0f64);

    // Checkpoints are written in the background; `finish` below waits for the last ones.
    let mut writer = checkpoint::Writer::new();
    for epoch in state.epochs_done + 1..=epochs {
        let epoch_start = Instant::now();
        // Resuming from an interrupt checkpoint continues the epoch at its next batch with the
        // epoch's running sums (as classification does). Segmentation keeps its correct and
        // labelled pixel counts in `EpochProgress::correct` and `::skipped` (it skips no image).
        let first_batch = std::mem::take(&mut state.batch_in_epoch);
        let partial = std::mem::take(&mut state.partial);
        let loader = SegLoader::train_from(train_ds.clone(), cfg, bs, cfg.seed, epoch, first_batch);
        let bar = progress_bar(opts.progress, loader.num_batches() as u64, epoch, epochs);
        bar.set_position(first_batch as u64);
        // Loss and correct-pixel sums stay on the device between reads, as in classification;
        // the labelled-pixel count comes from the CPU masks.
        let mut sums = EpochSums::new(
            partial.loss_sum,
            partial.correct,
            device,
            read_every,
            scaler.enabled,
            &ckpt_dir,
        );
        let (mut seen, mut pixels) = (partial.seen, partial.skipped as i64);
        let seen_before = seen;
        let mut lr = schedule.lr_at(state.global_step);
        let train_start = Instant::now();
        let mut steps_done = first_batch;
        for (i, batch) in loader.enumerate() {
            let step_in_epoch = first_batch + i;
            let batch = batch?;
            let b = batch.len();
            if b == 0 {
                continue;
            }
            lr = schedule.lr_at(state.global_step);
            let x = to_device_input(&batch.images, device, channels_last);
            let y = crate::device::upload(&batch.masks, device);
            let n_labelled = labelled(&batch.masks, ignore);
            // Dropout draws from libtorch's generator: seed it per step so a resume replays them.
            tch::manual_seed(
                derive_seed(cfg.seed, "segment-dropout", state.global_step as u64, 0) as i64,
            );
            let (logits, loss) = {
                let _ac = Autocast::enter(precision, device);
                let logits = net.forward_t(&x, true);
                let loss = pixel_ce_sum(&logits, &y, ignore) / n_labelled.max(1) as f64;
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
                None,
                opts.stop.load(Ordering::SeqCst),
                sums.reads_every_step(),
            )?;
            let hits = tch::no_grad(|| {
                logits
                    .argmax(1, false)
                    .eq_tensor(&y)
                    .logical_and(&y.ne(ignore))
                    .sum(Kind::Int64)
            });
            let current = sums.add(&step.loss, &hits, b as i64, state.global_step)?;
            state.global_step += 1;
            seen += b;
            pixels += n_labelled;
            if current {
                let ips =
                    (seen - seen_before) as f64 / train_start.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.4} pixel acc {:.2}% lr {:.4} {:.1} img/s",
                    sums.loss / seen as f64,
                    100.0 * sums.correct as f64 / pixels.max(1) as f64,
                    lr,
                    ips
                ));
            }
            bar.inc(1);
            steps_done = step_in_epoch + 1;
            let step_limit = cfg.train.max_steps > 0 && state.global_step >= cfg.train.max_steps;
            if step.stop || step_limit {
                // At the end of an epoch the epoch is finished normally below.
                stopped_early = true;
                if steps_done < iters_per_epoch {
                    break;
                }
            }
        }
        bar.finish_and_clear();
        sums.read()?;
        let (loss_sum, correct) = (sums.loss, sums.correct);
        if seen == 0 {
            bail!("epoch {epoch}: no training batches");
        }
        let train_seconds = train_start.elapsed().as_secs_f64();
        state.train_seconds += train_seconds;
        if stopped_early && steps_done < iters_per_epoch {
            // Mid-epoch stop: save where the epoch stands; `--resume` continues at the next batch.
            state.epochs_done = epoch - 1;
            state.batch_in_epoch = steps_done;
            state.partial = checkpoint::EpochProgress {
                loss_sum,
                correct,
                seen,
                skipped: pixels as usize,
            };
            scaler.record(&mut state);
            let path = ckpt_dir.join(checkpoint::INTERRUPT_FILE);
            writer.submit(training_checkpoint(&path, &vs, &opt, cfg, &classes, &state))?;
            log(&format!(
                "stopped at epoch {epoch}, step {steps_done}/{iters_per_epoch}: checkpoint written to {}; continue with --resume",
                path.display()
            ));
            break;
        }
        last_ips = (seen - seen_before) as f64 / train_seconds.max(1e-9);
        ips_images += seen - seen_before;
        ips_seconds += train_seconds;

        let is_last = epoch == epochs || stopped_early;
        let eval = if epoch % cfg.train.eval_every == 0 || is_last {
            let loader = SegLoader::eval(val_ds.clone(), cfg, bs);
            Some(evaluate(
                &net,
                loader,
                device,
                precision,
                channels_last,
                ignore,
            )?)
        } else {
            None
        };
        if let Some(e) = &eval {
            if e.miou > state.best_top1 || state.best_epoch == 0 {
                state.best_top1 = e.miou;
                state.best_epoch = epoch;
                save_weights(&writer, &out.join("best.safetensors"), &vs, cfg, &classes)?;
            }
        }
        let m = SegEpochMetrics {
            epoch,
            lr,
            train_loss: loss_sum / seen as f64,
            train_top1: 100.0 * correct as f64 / pixels.max(1) as f64,
            val_loss: eval.as_ref().map(|e| e.loss),
            pixel_acc: eval.as_ref().map(|e| e.pixel_acc),
            miou: eval.as_ref().map(|e| e.miou),
            val_top1: eval.as_ref().map(|e| e.miou),
            val_top5: eval.as_ref().map(|e| e.pixel_acc),
            images_per_second: last_ips,
            seconds: epoch_start.elapsed().as_secs_f64(),
        };
        metrics::append(&metrics_path, &m)?;
        log(&format_epoch(&m, epochs));
        if eval.is_some() {
            last_eval = eval;
        }

        state.epochs_done = epoch;
        scaler.record(&mut state);
        save_epoch_checkpoint(&writer, &ckpt_dir, epoch, &vs, &opt, cfg, &classes, &state)?;
        if stopped_early {
            break;
        }
    }

    let final_eval = match last_eval {
        Some(e) => e,
        None => evaluate(
            &net,
            SegLoader::eval(val_ds.clone(), cfg, bs),
            device,
            precision,
            channels_last,
            ignore,
        )?,
    };
    let best_pixel_acc = read_metrics(&metrics_path)
        .ok()
        .and_then(|ms| ms.into_iter().find(|m| m.epoch == state.best_epoch))
        .and_then(|m| m.pixel_acc)
        .unwrap_or(final_eval.pixel_acc);
    let summary = SegSummary {
        epochs: state.epochs_done,
        best_miou: state.best_top1,
        best_epoch: state.best_epoch,
        best_pixel_acc,
        final_miou: final_eval.miou,
        final_pixel_acc: final_eval.pixel_acc,
        final_val_loss: final_eval.loss,
        train_seconds: state.train_seconds,
        images_per_second: if ips_seconds > 0.0 {
            ips_images as f64 / ips_seconds
        } else {
            last_ips
        },
        stopped_early,
        best_top1: state.best_top1,
        final_top1: final_eval.miou,
        final_top5: final_eval.pixel_acc,
    };
    writer.finish()?;
    if !stopped_early {
        checkpoint::write_atomic(
            &out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(summary)
}
