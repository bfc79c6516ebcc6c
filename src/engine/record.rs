//! The records every task writes: a line of `metrics.jsonl` per epoch and `summary.json`, each
//! the engine's figures and the task's own under their real names (top-1, mIoU, …), flattened
//! into one JSON object. `Deref` reaches the task's fields, so `line.val_top1` reads as written.

use crate::metrics::EpochRecord;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Deref;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine<T> {
    pub epoch: usize,
    /// Learning rate at the last step of the epoch.
    pub lr: f64,
    /// Mean training loss of the epoch's batches.
    pub train_loss: f64,
    /// The task's figures: its training accuracy and, on evaluated epochs, its evaluation.
    #[serde(flatten)]
    pub task: T,
    /// Mean validation loss, on evaluated epochs.
    pub val_loss: Option<f64>,
    /// With `ema.decay`, on evaluated epochs: the moving average's evaluation, by the names of
    /// the live weights' (`val_top1`, `val_loss`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ema: BTreeMap<String, f64>,
    /// Training throughput of this epoch (loading + augmentation + training, no evaluation).
    pub images_per_second: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
    /// Unreadable images skipped (`data.skip_bad_images`).
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

/// A task's fields of a metrics line, as the epoch's log line shows them.
pub trait EpochFields: Serialize + DeserializeOwned + Clone {
    /// The training accuracy, e.g. `top-1 93.10%`.
    fn describe_train(&self) -> String;
    /// The evaluation's figures, e.g. `top-1 91.20% top-5 99.10%` (`None` on an epoch without
    /// an evaluation).
    fn describe_eval(&self) -> Option<String>;
}

impl<T: EpochFields> MetricsLine<T> {
    /// The epoch's log line.
    pub fn describe(&self, epochs: usize) -> String {
        let val = match (self.val_loss, self.task.describe_eval()) {
            (Some(l), Some(e)) => format!(" | val loss {l:.4} {e}"),
            (None, Some(e)) => format!(" | val {e}"),
            _ => String::new(),
        };
        let ips = self.images_per_second;
        let digits = if ips < 100.0 { 1 } else { 0 };
        format!(
            "epoch {}/{epochs}: lr {:.5} train loss {:.4} {}{val} | {ips:.digits$} img/s, {:.1}s (data wait {:.1}s){}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.task.describe_train(),
            self.seconds,
            self.data_wait_seconds,
            if self.skipped_images > 0 {
                format!(", {} bad images skipped", self.skipped_images)
            } else {
                String::new()
            }
        )
    }
}

/// The task's fields of epoch `epoch`'s line in the `metrics.jsonl` at `path` (`None` when the
/// file or the line cannot be read): a summary's figures at the best epoch.
pub fn epoch_fields_at<T: EpochFields>(path: &std::path::Path, epoch: usize) -> Option<T> {
    crate::metrics::read::<MetricsLine<T>>(path)
        .ok()?
        .into_iter()
        .find(|m| m.epoch == epoch)
        .map(|m| m.task)
}

impl<T> Deref for MetricsLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.task
    }
}

impl<T: Serialize + DeserializeOwned> EpochRecord for MetricsLine<T> {
    fn epoch(&self) -> usize {
        self.epoch
    }
}

/// What a finished run reports, written to `summary.json` when it ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary<T> {
    /// Epochs completed.
    pub epochs: usize,
    /// The task's figures: the best and final headline metric, and the others.
    #[serde(flatten)]
    pub task: T,
    /// The epoch of the best evaluation by the task's headline metric.
    pub best_epoch: usize,
    /// The last evaluation's mean loss (absent for detection, whose evaluation has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_val_loss: Option<f64>,
    /// Training time summed over resumes (evaluation excluded).
    pub train_seconds: f64,
    pub images_per_second: f64,
    /// True when the run stopped early on a signal or `train.max_steps`.
    pub stopped_early: bool,
}

impl<T> Deref for Summary<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.task
    }
}
