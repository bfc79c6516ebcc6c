//! The training engine: one driver for every task.
//!
//! A [`Task`] says what differs between tasks (its data and batches, the forward pass and loss
//! of one batch, the evaluation pass and its headline metric, the fields of its metrics line and
//! summary, and a few model hooks); [`train`] owns everything else, once: the run folder and
//! resolved config, seeding and initialisation, resume, precision and loss scaling, the
//! optimizer and its step, clipping, lookahead, data parallelism, progress, `metrics.jsonl`,
//! epoch, interrupt and best checkpoints, signals, NaN handling and `summary.json`.
//!
//! As in burn-train (a task implements a step, one learner owns the loop) and torchvision's
//! references (`train_one_epoch`, `evaluate`): [`Trainer::train_epoch`] and
//! [`Trainer::end_epoch`] read the same whatever the task and whatever tricks are on; the
//! tricks themselves were built into objects (criterion, mixup, teacher) by the task before the
//! loop.

mod record;
mod run;
mod step;
mod trainer;

pub use record::{epoch_fields_at, EpochFields, MetricsLine, Summary};
pub use run::{save_weights, Run, RunOptions, LOCK_FILE};
pub use step::StepPosition;
pub use trainer::Trainer;

use crate::train::optim::Optimizer;
use crate::train::DataParallel;
use anyhow::Result;
use serde::Serialize;
use tch::{nn, Tensor};

/// What one task (classification, segmentation, …) brings to the engine.
pub trait Task: Sized {
    /// A batch as the task's loader yields it.
    type Batch: TaskBatch;
    /// The batches of one training pass.
    type Batches: BatchStream<Item = Result<Self::Batch>>;
    /// What an evaluation pass measures.
    type Eval: Evaluation;
    /// The task's fields of a `metrics.jsonl` line ([`MetricsLine`]).
    type EpochFields: EpochFields;
    /// The task's fields of `summary.json` ([`Summary`]).
    type SummaryFields: Serialize;

    /// Opens the task's data (both splits) and checks it against the config, before the model
    /// exists.
    fn open(run: &Run) -> Result<Opened<Self>>;
    /// Builds the model's variables under `root` (libtorch's generator is seeded with the run's
    /// seed, under [`crate::train::MODEL_INIT_LOCK`]).
    fn build_model(&mut self, root: &nn::Path) -> Result<()>;
    /// Before the optimizer exists: weights from another checkpoint, frozen parameters.
    fn init_weights(&mut self, _vs: &nn::VarStore, _run: &Run) -> Result<()> {
        Ok(())
    }
    /// The backbone's learning-rate multiplier, when it is not 1.
    fn backbone_lr_mult(&self, _run: &Run) -> Option<BackboneLr> {
        None
    }
    /// A run that starts from scratch, on rank 0, once the optimizer exists: initialisation that
    /// a resumed run has in its checkpoint (airbench94's whitening, a segmentation backbone).
    fn on_fresh_start(
        &mut self,
        _vs: &nn::VarStore,
        _opt: &mut Optimizer,
        _run: &Run,
    ) -> Result<()> {
        Ok(())
    }
    /// Once the weights are final and in the training layout, before the first step
    /// (classification loads its distillation teacher here).
    fn before_training(&mut self, _run: &Run) -> Result<()> {
        Ok(())
    }
    /// At the start of every epoch (airbench94's whitening bias is frozen after its epochs).
    fn start_epoch(&mut self, _epoch: usize, _opt: &mut Optimizer) {}
    /// The training batches of `epoch` from batch `first_batch` on (a mid-epoch resume).
    fn train_batches(&self, run: &Run, epoch: usize, first_batch: usize) -> Result<Self::Batches>;
    /// Forward pass and loss of one batch (under the run's precision), with the task's counters.
    fn train_step(&self, batch: &Self::Batch, at: &StepContext) -> Result<StepOutput>;
    /// The evaluation pass over the whole evaluation split (every rank its shard, the sums
    /// gathered over ranks).
    fn evaluate(&self, run: &Run, dp: Option<&DataParallel>) -> Result<Self::Eval>;
    /// `train.untimed_warmup`: a training batch to warm the step with (none: the step is not
    /// warmed).
    fn warmup_batch(&self, _run: &Run, _iters_per_epoch: usize) -> Result<Option<Self::Batch>> {
        Ok(None)
    }
    /// `train.untimed_warmup`: the evaluation's forward passes, their results thrown away.
    fn warm_up_evaluation(&self, _run: &Run) -> Result<()> {
        Ok(())
    }
    /// The task's fields of an epoch's metrics line, from the epoch's training figures and its
    /// evaluation, if the epoch had one.
    fn epoch_fields(&self, train: &TrainFigures, eval: Option<&Self::Eval>) -> Self::EpochFields;
    /// The task's fields of `summary.json` from the run's totals and its last evaluation.
    fn summary_fields(
        &self,
        run: &Run,
        totals: &RunTotals,
        last: &Self::Eval,
    ) -> Self::SummaryFields;
    /// The unit of the training accuracy in progress messages ("acc", "pixel acc"; "" for a
    /// task without one).
    fn train_accuracy_name(&self) -> &'static str {
        "acc"
    }
}

/// A learning-rate multiplier for a task's backbone.
#[derive(Debug, Clone, Copy)]
pub struct BackboneLr {
    /// Whether a parameter (by name) is the backbone's.
    pub is_backbone: fn(&str) -> bool,
    pub mult: f64,
}

/// A task with its data open, and what the engine keeps of that data.
pub struct Opened<T> {
    pub task: T,
    /// The class names, stored in every checkpoint.
    pub classes: Vec<String>,
    /// Samples one training epoch takes over all ranks, from which the steps per epoch follow:
    /// the training split (fewer under classification's repeated augmentation).
    pub train_len: usize,
}

/// The batches of a pass, knowing how many the whole pass has (for progress).
pub trait BatchStream: Iterator {
    fn num_batches(&self) -> usize;
}

impl<B> BatchStream for crate::data::Pass<B> {
    fn num_batches(&self) -> usize {
        crate::data::Pass::num_batches(self)
    }
}

impl BatchStream for crate::data::Batches {
    fn num_batches(&self) -> usize {
        crate::data::Batches::num_batches(self)
    }
}

/// What the engine needs to know of a batch.
pub trait TaskBatch {
    /// Samples in the batch (0: every image of it failed to load and was skipped).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Unreadable samples dropped from it (`data.skip_bad_images`).
    fn skipped(&self) -> usize {
        0
    }
}

/// What the engine reads of an evaluation.
pub trait Evaluation {
    /// The headline metric, which picks the best checkpoint (top-1, mIoU).
    fn headline(&self) -> f64;
    /// The mean validation loss (`None` for a task whose evaluation computes none, as
    /// detection's, where the model in evaluation mode returns detections, not losses).
    fn loss(&self) -> Option<f64>;
}

/// Where a training step runs.
pub struct StepContext<'a> {
    pub at: StepPosition,
    /// The data-parallel group, for a loss normalised over the global batch.
    pub dp: Option<&'a DataParallel>,
}

/// What a task's training step reports.
pub struct StepOutput {
    /// The loss to minimise: this process's share of the global batch's mean.
    pub loss: Tensor,
    /// Correct predictions (i64 scalar on the device: images, or pixels in segmentation).
    pub hits: Tensor,
    /// Samples in the batch (the loss's weight in the epoch's mean).
    pub samples: i64,
    /// What `hits` counts among: the samples, or the labelled pixels in segmentation.
    pub counted: usize,
    /// The loss's terms, each a mean over the batch like `loss` (detection's four), summed per
    /// epoch into [`TrainFigures::loss_parts`]; empty for a loss of one term.
    pub parts: Vec<Tensor>,
}

/// What an epoch of training measured, for the task's metrics line.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainFigures {
    /// Correct among counted (%): top-1, or pixel accuracy in segmentation.
    pub accuracy: f64,
    /// The epoch's mean of each of [`StepOutput::parts`].
    pub loss_parts: Vec<f64>,
}

/// What a run adds up to, for the task's summary.
#[derive(Debug, Clone, Copy)]
pub struct RunTotals {
    pub epochs: usize,
    /// The best headline metric and its epoch.
    pub best: f64,
    pub best_epoch: usize,
    pub train_seconds: f64,
    pub images_per_second: f64,
    pub stopped_early: bool,
}

/// Trains `T` as the config says, writing everything into `opts.out_dir`.
pub fn train<T: Task>(
    cfg: &crate::config::Config,
    opts: &RunOptions,
) -> Result<Summary<T::SummaryFields>> {
    let run = Run::open(cfg, opts)?;
    // The data first: a bad dataset (or an --out inside it) must leave nothing behind.
    let Opened {
        mut task,
        classes,
        train_len,
    } = T::open(&run)?;
    let _lock = run.prepare_folder()?;
    let mut trainer = Trainer::new(&run, &mut task, classes, train_len)?;
    trainer.warm_up(&task)?;
    for epoch in trainer.remaining_epochs() {
        let Some(trained) = trainer.train_epoch(&mut task, epoch)? else {
            break; // stopped mid-epoch: the interrupt checkpoint is written
        };
        let eval = match trainer.evaluation_due(epoch) {
            true => Some(trainer.timed_evaluation(&task)?),
            false => None,
        };
        if !trainer.end_epoch(&task, trained, eval)? {
            break;
        }
    }
    trainer.finish(&task)
}
