//! The driver's state and its passes: set-up (model, optimizer, resume, data parallelism), one
//! epoch of training, its end (best, metrics line, checkpoint), the untimed warm-up and the
//! summary.

use super::record::{EpochFields, MetricsLine, Summary};
use super::run::{progress_bar, save_weights, training_checkpoint, Run};
use super::step::{optimizer_step, EpochSums, StepPosition};
use super::{
    BatchStream, Evaluation, RunTotals, StepContext, StepOutput, Task, TaskBatch, TrainFigures,
};
use crate::checkpoint::{self, EpochProgress, TrainState};
use crate::config::Precision;
use crate::device::weights_to_channels_last;
use crate::metrics;
use crate::tensorboard::{self, RunEvents};
use crate::train::data_parallel::{dump_rank_weights, sync_from_rank0};
use crate::train::ema::Ema;
use crate::train::lookahead::Lookahead;
use crate::train::optim::Optimizer;
use crate::train::precision::LossScaler;
use crate::train::schedule::{peak_lr, LrSchedule};
use crate::train::{DataParallel, MODEL_INIT_LOCK};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::{nn, Device, Tensor};

/// Everything a run holds besides the task: the weights, the optimizer and its schedule, the
/// loss scaler, the training state, the data-parallel group and the checkpoint writer.
pub struct Trainer<'r, T: Task> {
    run: &'r Run<'r>,
    vs: nn::VarStore,
    opt: Optimizer,
    scaler: LossScaler,
    state: TrainState,
    schedule: LrSchedule,
    dp: Option<DataParallel>,
    /// Checkpoints are written in the background; [`Trainer::finish`] waits for the last ones.
    writer: checkpoint::Writer,
    /// The class names stored in every checkpoint.
    classes: Vec<String>,
    iters_per_epoch: usize,
    /// Steps between reads of the running sums ([`EpochSums::read_every`]).
    read_every: usize,
    stopped_early: bool,
    last_eval: Option<T::Eval>,
    /// Images and seconds of the finished epochs' training, and the last epoch's images/s.
    throughput: (usize, f64, f64),
    /// Rank 0's TensorBoard events (`<run>/tb/`); off on other ranks, or after a write failed.
    tb: RunEvents,
    /// The global step of the last per-step TensorBoard point (`train.log_every`).
    tb_logged_step: usize,
}

/// The training half of a finished epoch.
pub struct TrainedEpoch {
    epoch: usize,
    lr: f64,
    /// Sums over every rank.
    sums: EpochProgress,
    started: Instant,
    data_wait: f64,
}

impl<'r, T: Task> Trainer<'r, T> {
    /// Builds the model (seeded), the optimizer with lookahead and per-parameter rates, starts
    /// or resumes the run, makes the replicas of a data-parallel run identical, and puts the
    /// weights in the training layout.
    pub fn new(
        run: &'r Run<'r>,
        task: &mut T,
        classes: Vec<String>,
        train_len: usize,
    ) -> Result<Self> {
        let (cfg, device) = (run.cfg, run.device);
        // libtorch's generator is process-wide: runs started together (ablate --jobs N) would
        // interleave their draws, so seeding and initialisation happen under one lock.
        let vs = {
            let _guard = MODEL_INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(cfg.seed as i64);
            let vs = nn::VarStore::new(device);
            task.build_model(&vs.root())?;
            vs
        };
        let iters_per_epoch = run.iters_per_epoch(train_len)?;
        task.init_weights(&vs, run)?;
        let mut opt = Optimizer::new(&vs, &cfg.optim);
        let epochs = cfg.train.epochs;
        if cfg.optim.lookahead {
            opt.set_lookahead(Lookahead::new(&vs, &cfg.optim, epochs * iters_per_epoch));
        }
        if cfg.ema.is_on() {
            opt.set_ema(Ema::new(&vs, &cfg.ema));
        }
        if let Some(b) = task.backbone_lr_mult(run) {
            opt.set_lr_scale(b.is_backbone, b.mult);
        }
        let mut state = TrainState {
            loss_scale: 1.0,
            ..Default::default()
        };
        let mut scaler = LossScaler::new(cfg.train.precision == Precision::Fp16, device);
        let resumed = run.rank0
            && run.resume_or_start::<MetricsLine<T::EpochFields>>(
                &vs,
                &mut opt,
                &mut scaler,
                &mut state,
            )?;
        if run.rank0 && !resumed {
            task.on_fresh_start(&vs, &mut opt, run)?;
        }
        if let Some(group) = &run.opts.dist {
            sync_from_rank0(group, &vs, &mut opt, &mut state)?;
            scaler.restore(&state);
        }
        if cfg.train.channels_last {
            weights_to_channels_last(&vs);
        }
        opt.flatten();
        let dp = match &run.opts.dist {
            Some(group) => Some(DataParallel::new(group.clone(), &opt, &cfg.distributed)?),
            None => None,
        };
        if let Some(dp) = &dp {
            run.log(&format!(
                "data-parallel: {} ranks over {}, batch {} per rank = {} global, batch norm {}",
                dp.world_size(),
                if device.is_cuda() { "NCCL" } else { "Gloo" },
                cfg.train.batch_size,
                cfg.train.batch_size * dp.world_size(),
                if dp.sync_bn() {
                    "synchronised"
                } else {
                    "per rank"
                }
            ));
        }
        task.before_training(run)?;
        let peak_lr = peak_lr(&cfg.optim, cfg.train.batch_size, run.shard.world);
        // A resumed run writes a new event file holding only the epochs and steps after its
        // checkpoint's, so that none is written twice.
        let tb = if run.rank0 && state.epochs_done < epochs {
            RunEvents::create(&run.out_dir().join(tensorboard::DIR))?
        } else {
            RunEvents::off()
        };
        let global_step = state.global_step;
        Ok(Trainer {
            run,
            vs,
            opt,
            scaler,
            state,
            schedule: LrSchedule::new(&cfg.optim, peak_lr, iters_per_epoch, epochs),
            read_every: EpochSums::read_every(device, dp.is_some()),
            dp,
            writer: checkpoint::Writer::new(),
            classes,
            iters_per_epoch,
            stopped_early: false,
            last_eval: None,
            throughput: (0, 0.0, 0.0),
            tb,
            tb_logged_step: global_step,
        })
    }

    /// The epochs still to train.
    pub fn remaining_epochs(&self) -> std::ops::RangeInclusive<usize> {
        self.state.epochs_done + 1..=self.run.cfg.train.epochs
    }

    /// `train.untimed_warmup`: before the first epoch, one training step on the task's warm-up
    /// batch (the task's forward pass and loss, then the trainer's own [`optimizer_step`] and a
    /// lookahead average) and the evaluation's forward passes, so that cuDNN's autotuning for
    /// these shapes and each kernel's first-use loading happen outside the timed epochs, as in
    /// airbench's warm-up run. Nothing is kept: the variables (BN statistics included), the
    /// optimiser's momentum, lookahead's slow weights and the loss scaler's state are put back,
    /// the gradients zeroed.
    pub fn warm_up(&mut self, task: &T) -> Result<()> {
        let run = self.run;
        if !run.cfg.train.untimed_warmup || self.state.epochs_done >= run.cfg.train.epochs {
            return Ok(());
        }
        if self.dp.is_some() {
            run.log("train.untimed_warmup: skipped in a data-parallel run");
            return Ok(());
        }
        let t = Instant::now();
        let saved: Vec<(Tensor, Tensor)> = (self.vs.variables().into_values())
            .map(|v| {
                let copy = tch::no_grad(|| v.detach().copy());
                (v, copy)
            })
            .collect();
        let saved_optimiser = self.opt.snapshot();
        let mut saved_scaler = TrainState::default();
        self.scaler.record(&mut saved_scaler);
        if let Some(batch) = task.warmup_batch(run, self.iters_per_epoch)? {
            let at = StepPosition {
                epoch: 1,
                step_in_epoch: 0,
                global_step: 0,
            };
            let out = task.train_step(&batch, &StepContext { at, dp: None })?;
            let lr = self.schedule.lr_at(self.state.global_step);
            let (opt, scaler) = (&mut self.opt, &mut self.scaler);
            let optim = &run.cfg.optim;
            optimizer_step(
                &out.loss,
                opt,
                scaler,
                optim,
                lr,
                &run.ckpt_dir,
                at,
                None,
                false,
                false,
            )?;
            if let Some(la) = self.opt.lookahead_mut() {
                la.warm_up();
            }
            if let Some(ema) = self.opt.ema_mut() {
                ema.update(0.5);
            }
        }
        self.opt.zero_grad();
        task.warm_up_evaluation(run)?;
        tch::no_grad(|| {
            for (mut v, copy) in saved {
                v.copy_(&copy);
            }
        });
        self.opt.restore(saved_optimiser);
        self.scaler.restore(&saved_scaler);
        if let Device::Cuda(i) = run.device {
            tch::Cuda::synchronize(i as i64);
        }
        run.log(&format!(
            "untimed warm-up (a training step and an evaluation pass, undone): {:.1}s",
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// One epoch of training (from the next batch of an interrupted epoch on). `None` when it
    /// stopped before its end (a signal or `train.max_steps`): the interrupt checkpoint is then
    /// written and the run is over.
    pub fn train_epoch(&mut self, task: &mut T, epoch: usize) -> Result<Option<TrainedEpoch>> {
        let (run, cfg) = (self.run, self.run.cfg);
        let started = Instant::now();
        // Resuming from an interrupt checkpoint continues the epoch at its next batch, with the
        // epoch's running sums, so the epoch's metrics come out as if never interrupted. (In a
        // data-parallel run the saved sums are over all ranks: rank 0 carries them.)
        let first_batch = std::mem::take(&mut self.state.batch_in_epoch);
        task.start_epoch(epoch, &mut self.opt);
        let partial = std::mem::take(&mut self.state.partial);
        let mut p = if run.rank0 {
            partial
        } else {
            Default::default()
        };
        let batches = task.train_batches(run, epoch, first_batch)?;
        let bar = progress_bar(
            run.opts.progress,
            batches.num_batches() as u64,
            epoch,
            cfg.train.epochs,
        );
        bar.set_position(first_batch as u64);
        let mut sums = EpochSums::new(
            p.loss_sum,
            p.correct,
            p.parts_sum.clone(),
            run.device,
            self.read_every,
            self.scaler.enabled,
            &run.ckpt_dir,
        );
        let seen_before = p.seen;
        // The running sums at the last per-step TensorBoard point of this epoch.
        let mut logged = (p.loss_sum, p.seen);
        let mut lr = self.schedule.lr_at(self.state.global_step);
        let train_start = Instant::now();
        let (mut steps_done, mut data_wait) = (first_batch, 0.0);
        let mut batches = batches.enumerate();
        loop {
            let asked = Instant::now();
            let Some((i, batch)) = batches.next() else {
                break;
            };
            data_wait += asked.elapsed().as_secs_f64();
            let batch = batch?;
            p.skipped += batch.skipped();
            if batch.is_empty() {
                continue;
            }
            let at = StepPosition {
                epoch,
                step_in_epoch: first_batch + i,
                global_step: self.state.global_step,
            };
            lr = self.schedule.lr_at(at.global_step);
            let (out, current, stop) = self.step(task, &batch, at, lr, &mut sums)?;
            if let Some(message) = run.threads.adapt() {
                bar.suspend(|| run.log(&message));
            }
            p.seen += out.samples as usize;
            p.counted += out.counted;
            if current {
                let ips = (p.seen - seen_before) as f64 / train_start.elapsed().as_secs_f64();
                let accuracy = match task.train_accuracy_name() {
                    "" => String::new(),
                    name => format!(
                        " {name} {:.2}%",
                        100.0 * sums.correct as f64 / p.counted.max(1) as f64
                    ),
                };
                bar.set_message(format!(
                    "loss {:.4}{accuracy} lr {:.4} {ips:.1} img/s",
                    sums.loss / p.seen as f64,
                    lr,
                ));
                logged = self.log_steps(logged, (sums.loss, p.seen), lr);
            }
            bar.inc(1);
            steps_done = at.step_in_epoch + 1;
            let step_limit =
                cfg.train.max_steps > 0 && self.state.global_step >= cfg.train.max_steps;
            if stop || step_limit {
                // At the end of an epoch the epoch is finished normally.
                self.stopped_early = true;
                if steps_done < self.iters_per_epoch {
                    break;
                }
            }
        }
        bar.finish_and_clear();
        sums.read()?;
        (p.loss_sum, p.correct, p.parts_sum) = (sums.loss, sums.correct, sums.parts);
        let p = self.over_all_ranks(p)?;
        if p.seen == 0 {
            bail!("epoch {epoch}: no usable training images (every image of the epoch failed to load)");
        }
        let train_seconds = train_start.elapsed().as_secs_f64();
        self.state.train_seconds += train_seconds;
        if self.stopped_early && steps_done < self.iters_per_epoch {
            self.interrupt(epoch, steps_done, p)?;
            return Ok(None);
        }
        let images = p.seen - seen_before;
        self.throughput.0 += images;
        self.throughput.1 += train_seconds;
        self.throughput.2 = images as f64 / train_seconds.max(1e-9);
        if let Some(dp) = &self.dp {
            dp.broadcast_buffers(&self.vs)?;
            dp.check_replicas(&self.vs)?;
        }
        Ok(Some(TrainedEpoch {
            epoch,
            lr,
            sums: p,
            started,
            data_wait,
        }))
    }

    /// One training step on `batch`: the task's forward pass and loss, the optimizer step, the
    /// running sums, lookahead. Returns the task's output, whether the sums were read back (the
    /// running figures are current) and whether to stop after this step.
    fn step(
        &mut self,
        task: &T,
        batch: &T::Batch,
        at: StepPosition,
        lr: f64,
        sums: &mut EpochSums,
    ) -> Result<(StepOutput, bool, bool)> {
        let run = self.run;
        let dp = self.dp.as_ref();
        let out = task.train_step(batch, &StepContext { at, dp })?;
        let step = optimizer_step(
            &out.loss,
            &mut self.opt,
            &mut self.scaler,
            &run.cfg.optim,
            lr,
            &run.ckpt_dir,
            at,
            dp,
            run.stop_requested(),
            sums.reads_every_step(),
        )?;
        let current = sums.add(
            &step.loss,
            &out.hits,
            &out.parts,
            out.samples,
            at.global_step,
        )?;
        self.state.global_step += 1;
        if let Some(la) = self.opt.lookahead_mut() {
            la.after_step(self.state.global_step);
        }
        if let Some(ema) = self.opt.ema_mut() {
            ema.after_step(self.state.global_step);
        }
        Ok((out, current, step.stop))
    }

    /// `train.log_every`: at a read-back of the running sums (`now`: the epoch's loss sum and
    /// images so far) that reaches or passes a multiple of N steps, writes the mean training
    /// loss since the last point (`last`) and the lr at the global step. Only values already on
    /// the host: no device sync. Returns the sums of the last point.
    fn log_steps(&mut self, last: (f64, usize), now: (f64, usize), lr: f64) -> (f64, usize) {
        let n = self.run.cfg.train.log_every;
        let step = self.state.global_step;
        if n == 0 || !self.tb.is_on() || step / n <= self.tb_logged_step / n || now.1 <= last.1 {
            return last;
        }
        self.tb_logged_step = step;
        let loss = (now.0 - last.0) / (now.1 - last.1) as f64;
        let run = self.run;
        let values = [
            ("train_step/loss".to_string(), loss as f32),
            ("train_step/lr".to_string(), lr as f32),
        ];
        self.tb.scalars(step as u64, &values, &|m| run.log(m));
        now
    }

    /// An epoch's sums over every rank of a data-parallel run.
    fn over_all_ranks(&self, p: EpochProgress) -> Result<EpochProgress> {
        let Some(dp) = &self.dp else { return Ok(p) };
        let mut v = vec![
            p.loss_sum,
            p.correct as f64,
            p.seen as f64,
            p.skipped as f64,
            p.counted as f64,
        ];
        v.extend(&p.parts_sum);
        let v = dp.sum(&v)?;
        Ok(EpochProgress {
            loss_sum: v[0],
            correct: v[1] as i64,
            seen: v[2] as usize,
            skipped: v[3] as usize,
            counted: v[4] as usize,
            parts_sum: v[5..].to_vec(),
        })
    }

    /// Mid-epoch stop: saves where the epoch stands; `--resume` continues at the next batch.
    fn interrupt(&mut self, epoch: usize, steps: usize, p: EpochProgress) -> Result<()> {
        let run = self.run;
        self.tb.flush(&|m| run.log(m));
        self.state.epochs_done = epoch - 1;
        self.state.batch_in_epoch = steps;
        self.state.partial = p;
        self.scaler.record(&mut self.state);
        let path = run.ckpt_dir.join(checkpoint::INTERRUPT_FILE);
        if let Some(dp) = &self.dp {
            dp.broadcast_buffers(&self.vs)?;
        }
        if run.rank0 {
            let (vs, opt, state) = (&self.vs, &self.opt, &self.state);
            let write = training_checkpoint(&path, vs, opt, run.cfg, &self.classes, state);
            self.writer.submit(write)?;
        }
        run.log(&format!(
            "stopped at epoch {epoch}, step {steps}/{}: checkpoint written to {}; continue with --resume",
            self.iters_per_epoch,
            path.display()
        ));
        Ok(())
    }

    /// Whether `epoch` ends with an evaluation: every `train.eval_every` epochs and at the end.
    pub fn evaluation_due(&self, epoch: usize) -> bool {
        let cfg = self.run.cfg;
        epoch.is_multiple_of(cfg.train.eval_every)
            || epoch == cfg.train.epochs
            || self.stopped_early
    }

    /// The task's evaluation of the live weights and, with `ema.decay`, of their average; and
    /// the seconds of both.
    pub fn timed_evaluation(&mut self, task: &T) -> Result<Evaluated<T::Eval>> {
        let t = Instant::now();
        let live = task.evaluate(self.run, self.dp.as_ref())?;
        let ema = self.evaluate_average(task)?;
        Ok(Evaluated {
            live,
            ema,
            seconds: t.elapsed().as_secs_f64(),
        })
    }

    /// The evaluation of the weights' moving average (`None` without `ema.decay`): the average
    /// goes into the model for the pass and the live weights come back after it, also on error.
    fn evaluate_average(&mut self, task: &T) -> Result<Option<T::Eval>> {
        let Some(ema) = self.opt.ema_mut() else {
            return Ok(None);
        };
        ema.swap();
        let eval = task.evaluate(self.run, self.dp.as_ref());
        if let Some(ema) = self.opt.ema_mut() {
            ema.swap();
        }
        eval.map(Some)
    }

    /// Whether the run's result (best checkpoint, summary) is the moving average's.
    fn result_is_average(&self) -> bool {
        self.run.cfg.ema.is_on() && self.run.cfg.ema.use_for_best
    }

    /// The end of an epoch: the best weights, the metrics line, the epoch checkpoint. Returns
    /// whether training goes on.
    pub fn end_epoch(
        &mut self,
        task: &T,
        trained: TrainedEpoch,
        eval: Option<Evaluated<T::Eval>>,
    ) -> Result<bool> {
        let (run, cfg) = (self.run, self.run.cfg);
        let epoch = trained.epoch;
        let average = self.result_is_average();
        if let Some(e) = &eval {
            let result = match (&e.ema, average) {
                (Some(avg), true) => avg,
                _ => &e.live,
            };
            if result.headline() > self.state.best_metric || self.state.best_epoch == 0 {
                self.state.best_metric = result.headline();
                self.state.best_epoch = epoch;
                if run.rank0 {
                    let best = run.out_dir().join("best.safetensors");
                    self.save_result_weights(&best, average)?;
                }
            }
        }
        let p = &trained.sums;
        let train = TrainFigures {
            accuracy: 100.0 * p.correct as f64 / p.counted.max(1) as f64,
            loss_parts: p.parts_sum.iter().map(|s| s / p.seen as f64).collect(),
        };
        let ema = match eval.as_ref().and_then(|e| e.ema.as_ref()) {
            Some(avg) => average_fields(task, &train, avg)?,
            None => BTreeMap::new(),
        };
        let m = MetricsLine {
            epoch,
            lr: trained.lr,
            train_loss: p.loss_sum / p.seen as f64,
            task: task.epoch_fields(&train, eval.as_ref().map(|e| &e.live)),
            val_loss: eval.as_ref().and_then(|e| e.live.loss()),
            ema,
            images_per_second: self.throughput.2,
            seconds: trained.started.elapsed().as_secs_f64(),
            skipped_images: p.skipped,
            data_wait_seconds: trained.data_wait,
            eval_seconds: eval.as_ref().map_or(0.0, |e| e.seconds),
        };
        self.state.epochs_done = epoch;
        self.scaler.record(&mut self.state);
        if run.rank0 {
            metrics::append(&run.metrics_path, &m)?;
            let mut scalars = tensorboard::scalars_of(&serde_json::to_value(&m)?, &["epoch"]);
            scalars.extend(m.ema.iter().map(|(k, v)| {
                (
                    format!("ema/{}", k.strip_prefix("val_").unwrap_or(k)),
                    *v as f32,
                )
            }));
            self.tb.scalars(epoch as u64, &scalars, &|m| run.log(m));
            self.tb.flush(&|m| run.log(m));
            let mut line = m.describe(cfg.train.epochs);
            if let Some(avg) = eval.as_ref().and_then(|e| e.ema.as_ref()) {
                let figures = task.epoch_fields(&train, Some(avg)).describe_eval();
                let loss = avg
                    .loss()
                    .map(|l| format!(" loss {l:.4}"))
                    .unwrap_or_default();
                line.push_str(&format!(" | EMA{loss} {}", figures.unwrap_or_default()));
            }
            run.log(&line);
            self.save_epoch_checkpoint(epoch)?;
        }
        if let Some(e) = eval {
            self.last_eval = Some(match (e.ema, average) {
                (Some(avg), true) => avg,
                (_, _) => e.live,
            });
        }
        Ok(!self.stopped_early)
    }

    /// Saves the run's result weights to `path`: the live weights, or their moving average
    /// (swapped into the model for the copy that [`save_weights`] takes, then swapped back).
    fn save_result_weights(&mut self, path: &std::path::Path, average: bool) -> Result<()> {
        let (cfg, classes) = (self.run.cfg, &self.classes);
        match self.opt.ema_mut().filter(|_| average) {
            Some(ema) => {
                ema.swap();
                let saved = save_weights(&self.writer, path, &self.vs, cfg, classes);
                if let Some(ema) = self.opt.ema_mut() {
                    ema.swap();
                }
                saved
            }
            None => save_weights(&self.writer, path, &self.vs, cfg, classes),
        }
    }

    /// The checkpoint of a finished epoch; once it is written, older ones beyond
    /// `train.keep_checkpoints` and the epoch's interrupt checkpoint (now stale) are removed.
    fn save_epoch_checkpoint(&self, epoch: usize) -> Result<()> {
        let (run, ckpt_dir) = (self.run, &self.run.ckpt_dir);
        let path = checkpoint::epoch_checkpoint_path(ckpt_dir, epoch);
        let write = training_checkpoint(
            &path,
            &self.vs,
            &self.opt,
            run.cfg,
            &self.classes,
            &self.state,
        );
        let (dir, keep) = (ckpt_dir.clone(), run.cfg.train.keep_checkpoints);
        self.writer.submit(move || {
            write()?;
            checkpoint::prune(&dir, keep);
            let _ = std::fs::remove_file(dir.join(checkpoint::INTERRUPT_FILE));
            Ok(())
        })
    }

    /// The run's summary (`summary.json` when it finished), after the last checkpoints are on
    /// disk; evaluates once more if the last epoch had no evaluation.
    pub fn finish(mut self, task: &T) -> Result<Summary<T::SummaryFields>> {
        let run = self.run;
        let last = match self.last_eval.take() {
            Some(e) => e,
            None => {
                let average = self.result_is_average();
                match self.evaluate_average(task)? {
                    Some(avg) if average => avg,
                    _ => task.evaluate(run, self.dp.as_ref())?,
                }
            }
        };
        if let Some(dp) = &self.dp {
            dump_rank_weights(dp.rank(), &self.vs)?;
        }
        let (images, seconds, last_ips) = self.throughput;
        let totals = RunTotals {
            epochs: self.state.epochs_done,
            best: self.state.best_metric,
            best_epoch: self.state.best_epoch,
            train_seconds: self.state.train_seconds,
            images_per_second: if seconds > 0.0 {
                images as f64 / seconds
            } else {
                last_ips
            },
            stopped_early: self.stopped_early,
        };
        let summary = Summary {
            epochs: totals.epochs,
            task: task.summary_fields(run, &totals, &last),
            best_epoch: totals.best_epoch,
            final_val_loss: last.loss(),
            train_seconds: totals.train_seconds,
            images_per_second: totals.images_per_second,
            stopped_early: totals.stopped_early,
        };
        self.writer.finish()?;
        if !self.stopped_early && run.rank0 {
            checkpoint::write_atomic(
                &run.out_dir().join("summary.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
        }
        Ok(summary)
    }
}

/// An epoch's evaluation: of the live weights and, with `ema.decay`, of their moving average.
pub struct Evaluated<E> {
    pub live: E,
    pub ema: Option<E>,
    /// Wall time of both passes.
    pub seconds: f64,
}

/// The moving average's figures for a metrics line: the task's evaluation fields (`val_…`)
/// and its loss, by the names the live figures have.
fn average_fields<T: Task>(
    task: &T,
    train: &TrainFigures,
    avg: &T::Eval,
) -> Result<BTreeMap<String, f64>> {
    let fields = serde_json::to_value(task.epoch_fields(train, Some(avg)))?;
    let mut out: BTreeMap<String, f64> = fields
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("val_"))
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    if let Some(loss) = avg.loss() {
        out.insert("val_loss".into(), loss);
    }
    Ok(out)
}
