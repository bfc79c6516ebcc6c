//! Classification, the first task of the engine: ImageFolder or CIFAR images, a ResNet of the
//! family (or airbench94's network), cross entropy with the paper's tricks (label smoothing,
//! mixup, distillation), top-1/top-5 evaluation with optional test-time flip and translation,
//! fine-tuning from a checkpoint, airbench94's whitening init and bias freeze, and [`predict`]:
//! the top classes of image files with a trained checkpoint.

pub mod predict;
mod task;

pub use task::Classification;

use crate::checkpoint;
use crate::config::{Config, Precision};
use crate::data::Batch;
use crate::device::{to_channels_last, to_device_input, upload, weights_to_channels_last};
use crate::engine::{self, EpochFields, Evaluation, MetricsLine, RunOptions, Summary};
use crate::model::{self, Classifier};
use crate::train::loss::topk_hits;
use crate::train::precision::Autocast;
use crate::train::DataParallel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Trains a classifier as the config says, writing everything into `opts.out_dir`.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunSummary> {
    engine::train::<Classification>(cfg, opts)
}

/// The classification figures of a `metrics.jsonl` line (%).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassificationEpoch {
    /// Top-1 accuracy on the training batches (against the hard labels, augmented and mixed).
    pub train_top1: f64,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
}

impl EpochFields for ClassificationEpoch {
    fn describe_train(&self) -> String {
        format!("top-1 {:.2}%", self.train_top1)
    }
    fn describe_eval(&self) -> Option<String> {
        let (t1, t5) = (self.val_top1?, self.val_top5?);
        Some(format!("top-1 {t1:.2}% top-5 {t5:.2}%"))
    }
}

/// One line of a classification run's `metrics.jsonl`.
pub type EpochMetrics = MetricsLine<ClassificationEpoch>;

/// The classification figures of `summary.json` (%).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassificationSummary {
    pub best_top1: f64,
    pub final_top1: f64,
    pub final_top5: f64,
}

/// What a finished classification run reports (also written to `summary.json`).
pub type RunSummary = Summary<ClassificationSummary>;

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

/// Evaluation logits (f32) of a batch already on the device (as `settings` says: its device,
/// precision and layout); used by the evaluation and by [`predict`]. With `flip`, test-time flip
/// augmentation: the mean of the logits of the images and of their mirror images (the training
/// flips too, so both views are in-distribution; airbench scores this way). With `translate`,
/// airbench94's test-time translation on top (see [`EvalSettings::translate`]).
pub fn eval_logits(model: &Classifier, x: &Tensor, settings: EvalSettings) -> Tensor {
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

impl Evaluation for EvalResult {
    fn headline(&self) -> f64 {
        self.top1
    }
    fn loss(&self) -> Option<f64> {
        Some(self.loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
