//! [`Classification`]: the classification task as the engine drives it.

use super::{
    eval_logits, first_images, init_from_finetune, load_teacher, ClassificationEpoch,
    ClassificationSummary, EvalResult, EvalSettings, EvalSums, Teacher,
};
use crate::config::Config;
use crate::data::{self, Batch, Batches, Dataset, Loader, Resident, Shard};
use crate::device::{to_device_input, upload};
use crate::engine::{
    BackboneLr, Opened, Run, RunTotals, StepContext, StepOutput, Task, TaskBatch, TrainFigures,
};
use crate::model::{self, Classifier};
use crate::train::loss::{top1_hits, Criterion};
use crate::train::mixup::Mixup;
use crate::train::optim::Optimizer;
use crate::train::precision::Autocast;
use crate::train::DataParallel;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, ModuleT};

impl TaskBatch for Batch {
    fn len(&self) -> usize {
        Batch::len(self)
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
}

/// Samples one training epoch takes over all ranks, for the steps per epoch: the training split,
/// or under repeated augmentation (`data.repeats`) what each rank keeps
/// ([`data::repeated_samples_per_rank`]) times the ranks. Refuses a repeated epoch too short for
/// one batch.
fn epoch_samples(cfg: &Config, train_len: usize, shard: Shard) -> Result<usize> {
    if cfg.data.repeats <= 1 {
        return Ok(train_len);
    }
    let per_rank = data::repeated_samples_per_rank(train_len, shard.world);
    let bs = cfg.train.batch_size;
    if per_rank < bs {
        bail!(
            "key `data.repeats` ({}): repeated augmentation keeps ⌊⌊{train_len}/256⌋·256 / {} ranks⌋ = {per_rank} samples per rank and epoch (torchvision's RASampler), fewer than `train.batch_size` ({bs}); it needs at least {} training images here, or set data.repeats = 1",
            cfg.data.repeats,
            shard.world,
            (bs * shard.world).div_ceil(256) * 256
        );
    }
    Ok(per_rank * shard.world)
}

/// A classification run: its data, its model and its tricks, each built once.
pub struct Classification {
    cfg: Config,
    train_ds: Arc<dyn Dataset>,
    val_ds: Arc<dyn Dataset>,
    /// `data.on_device`: both splits decoded once into device memory.
    resident: Option<(Rc<Resident>, Rc<Resident>)>,
    num_classes: i64,
    net: Option<Classifier>,
    /// A linear probe: the frozen backbone runs in eval mode, only the classifier trains.
    probe: bool,
    criterion: Criterion,
    mixup: Option<Mixup>,
    teacher: Option<Teacher>,
    eval: EvalSettings,
    shard: Shard,
}

impl Classification {
    fn net(&self) -> &Classifier {
        self.net
            .as_ref()
            .expect("the model is built before training")
    }

    /// The evaluation batches of this process's shard of the evaluation split.
    fn eval_batches(&self) -> Batches {
        let bs = self.cfg.train.batch_size;
        match &self.resident {
            Some((_, val)) => Batches::Resident(val.eval_batches(bs, self.shard)),
            None => {
                let loader_cfg = self.cfg.data.for_device(self.eval.device);
                Batches::Loader(Loader::eval_shard(
                    self.val_ds.clone(),
                    &loader_cfg,
                    bs,
                    self.shard,
                ))
            }
        }
    }
}

impl Task for Classification {
    type Batch = Batch;
    type Batches = Batches;
    type Eval = EvalResult;
    type EpochFields = ClassificationEpoch;
    type SummaryFields = ClassificationSummary;

    fn open(run: &Run) -> Result<Opened<Self>> {
        let (cfg, device) = (run.cfg, run.device);
        let (train_ds, val_ds) = data::open_train_val(&cfg.data, cfg.seed)?;
        let classes: Vec<String> = train_ds.classes().to_vec();
        let num_classes = match cfg.model.num_classes {
            0 => classes.len() as i64,
            k => k,
        };
        if num_classes as usize != classes.len() {
            bail!(
                "key `model.num_classes` is {num_classes} but the dataset has {} classes",
                classes.len()
            );
        }
        let resident = if cfg.data.on_device {
            let t = Instant::now();
            let r = (
                Rc::new(Resident::load(&train_ds, &cfg.data, device)?),
                Rc::new(Resident::load(&val_ds, &cfg.data, device)?),
            );
            run.log(&format!(
                "data on {device:?}: {} + {} images decoded in {:.1}s",
                r.0.len(),
                r.1.len(),
                t.elapsed().as_secs_f64()
            ));
            Some(r)
        } else {
            None
        };
        let train_len = epoch_samples(cfg, train_ds.len(), run.shard)?;
        let task = Classification {
            cfg: cfg.clone(),
            train_ds,
            val_ds,
            resident,
            num_classes,
            net: None,
            probe: false,
            criterion: Criterion::from_config(cfg, num_classes),
            mixup: Mixup::from_config(cfg),
            teacher: None,
            eval: EvalSettings {
                device,
                precision: cfg.train.precision,
                channels_last: cfg.train.channels_last,
                flip: cfg.train.eval_flip,
                translate: cfg.train.eval_translate,
            },
            shard: run.shard,
        };
        Ok(Opened {
            task,
            classes,
            train_len,
        })
    }

    fn build_model(&mut self, root: &nn::Path) -> Result<()> {
        self.net = Some(Classifier::new(root, &self.cfg.model, self.num_classes)?);
        Ok(())
    }

    fn init_weights(&mut self, vs: &nn::VarStore, run: &Run) -> Result<()> {
        self.probe = init_from_finetune(&self.cfg, vs, &|m: &str| run.log(m))?;
        Ok(())
    }

    fn backbone_lr_mult(&self, _run: &Run) -> Option<BackboneLr> {
        let f = &self.cfg.finetune;
        (!f.from.is_empty() && f.backbone_lr_mult != 1.0).then_some(BackboneLr {
            is_backbone: |name| !name.starts_with("fc."),
            mult: f.backbone_lr_mult,
        })
    }

    /// airbench94's whitening conv is set from the data at the start of a run (a resumed run has
    /// it in its checkpoint; the other ranks of a data-parallel run get it from rank 0).
    fn on_fresh_start(&mut self, _vs: &nn::VarStore, opt: &mut Optimizer, run: &Run) -> Result<()> {
        let cfg = &self.cfg;
        let Classifier::Airbench(a) = self.net() else {
            return Ok(());
        };
        if !cfg.finetune.from.is_empty() {
            return Ok(());
        }
        // From the decoded images already on the device when there are some (no second decode,
        // and the covariance is computed there).
        let t = Instant::now();
        let n = model::WHITEN_IMAGES;
        let images = match &self.resident {
            Some((train, _)) => first_images(train.eval_batches(500, Shard::SINGLE), n)?,
            None => first_images(Loader::eval(self.train_ds.clone(), &cfg.data, 500), n)?,
        };
        a.init_whitening(&images)
            .with_context(|| format!("whitening from {}", cfg.data.dir))?;
        if let Some(la) = opt.lookahead_mut() {
            la.restart_from_model();
        }
        run.log(&format!(
            "whitening conv set from the 2x2 patches of the first {} training images in {:.2}s",
            images.iter().map(|t| t.size()[0]).sum::<i64>(),
            t.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn before_training(&mut self, run: &Run) -> Result<()> {
        let d = &self.cfg.distill;
        if !d.teacher.is_empty() {
            let path = Path::new(&d.teacher);
            let channels_last = self.cfg.train.channels_last;
            self.teacher = Some(load_teacher(
                path,
                run.device,
                self.num_classes,
                channels_last,
            )?);
        }
        Ok(())
    }

    fn start_epoch(&mut self, epoch: usize, opt: &mut Optimizer) {
        let whiten_bias_epochs = self.cfg.model.whiten_bias_epochs;
        if whiten_bias_epochs > 0 && epoch > whiten_bias_epochs {
            opt.freeze(|name| name == model::WHITEN_BIAS);
        }
    }

    fn train_batches(&self, run: &Run, epoch: usize, first: usize) -> Result<Batches> {
        let (cfg, bs) = (&self.cfg, self.cfg.train.batch_size);
        Ok(match &self.resident {
            Some((train, _)) => {
                Batches::Resident(train.train_batches(bs, cfg.seed, epoch, first, self.shard))
            }
            None => Batches::Loader(Loader::train_shard(
                self.train_ds.clone(),
                &cfg.data.for_device(run.device),
                bs,
                cfg.seed,
                epoch,
                first,
                self.shard,
            )),
        })
    }

    fn train_step(&self, batch: &Batch, ctx: &StepContext) -> Result<StepOutput> {
        let s = &self.eval;
        let x = to_device_input(&batch.images, s.device, s.channels_last);
        let y = upload(&batch.labels, s.device);
        let b = y.size()[0];
        // Stochastic depth and dropout draw from (seed, step, rank): a resumed run replays them.
        let rank = ctx.dp.map_or(0, |dp| dp.rank() as u64);
        let draws =
            crate::train::derive_seed(self.cfg.seed, "drop", ctx.at.global_step as u64, rank);
        self.net().set_draw_seed(draws);
        let mixup = self.mixup.filter(|m| m.active(ctx.at.epoch));
        let mut targets = self.criterion.targets(&y, mixup.is_some());
        let mut inputs = x;
        if let (Some(m), Some(q)) = (mixup, &targets) {
            let (mx, my) = m.apply(ctx.at.epoch, ctx.at.step_in_epoch, &inputs, q);
            inputs = mx;
            targets = Some(my);
        }
        let (logits, loss) = {
            let _ac = Autocast::enter(s.precision, s.device);
            let net = self.net();
            let logits = if self.probe {
                // Linear probe: the frozen backbone runs with its BN in eval mode.
                net.classify(&tch::no_grad(|| net.features(&inputs, false)))
            } else {
                net.forward_t(&inputs, true)
            };
            let teacher =
                (self.teacher.as_ref()).map(|t| tch::no_grad(|| t.model.forward_t(&inputs, false)));
            let loss = self
                .criterion
                .loss(&logits, &y, targets.as_ref(), teacher.as_ref());
            (logits, loss)
        };
        Ok(StepOutput {
            loss,
            hits: top1_hits(&logits, &y),
            samples: b,
            counted: b as usize,
            parts: Vec::new(),
        })
    }

    /// Validation over every rank's shard of the split, the sums gathered before the ratios.
    fn evaluate(&self, _run: &Run, dp: Option<&DataParallel>) -> Result<EvalResult> {
        EvalSums::over(self.net(), self.eval_batches(), self.eval)?
            .all_ranks(dp)?
            .result()
    }

    /// From a device-resident dataset, the epoch's last batch (so that the augmentation's kernels
    /// load too, with the draws of one batch, not of the epoch); from the CPU loader, which
    /// augments on the host, the first evaluation batch.
    fn warmup_batch(&self, _run: &Run, iters_per_epoch: usize) -> Result<Option<Batch>> {
        let (bs, seed) = (self.cfg.train.batch_size, self.cfg.seed);
        let batch = match &self.resident {
            Some((train, _)) => train
                .train_batches(bs, seed, 1, iters_per_epoch - 1, self.shard)
                .next(),
            None => self.eval_batches().next(),
        };
        let batch = batch.ok_or_else(|| anyhow!("the evaluation split has no images"))??;
        Ok(Some(batch))
    }

    /// The evaluation's forward passes: a full batch and, when the split does not divide into
    /// full batches, the size of the last one.
    fn warm_up_evaluation(&self, _run: &Run) -> Result<()> {
        let s = self.eval;
        let eval = (self.eval_batches().next())
            .ok_or_else(|| anyhow!("the evaluation split has no images"))??;
        let x = to_device_input(&eval.images, s.device, s.channels_last);
        let _ = eval_logits(self.net(), &x, s);
        let val_len = match &self.resident {
            Some((_, val)) => val.len(),
            None => self.val_ds.len(),
        };
        let tail = val_len % self.cfg.train.batch_size;
        if tail > 0 && (tail as i64) < x.size()[0] {
            let _ = eval_logits(self.net(), &x.narrow(0, 0, tail as i64), s);
        }
        Ok(())
    }

    fn epoch_fields(&self, train: &TrainFigures, eval: Option<&EvalResult>) -> ClassificationEpoch {
        ClassificationEpoch {
            train_top1: train.accuracy,
            val_top1: eval.map(|e| e.top1),
            val_top5: eval.map(|e| e.top5),
        }
    }

    fn summary_fields(
        &self,
        _run: &Run,
        t: &RunTotals,
        last: &EvalResult,
    ) -> ClassificationSummary {
        ClassificationSummary {
            best_top1: t.best,
            final_top1: last.top1,
            final_top5: last.top5,
        }
    }
}
