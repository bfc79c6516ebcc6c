//! Using a trained classification checkpoint: the top classes of image files, with their
//! probabilities.
//!
//! Each image goes through the evaluation transform of the checkpoint's own `[data]` settings
//! (the CIFAR pipeline at `val_size`, or the ImageNet pipeline's resize and centre crop),
//! normalised as in training, and through the evaluation's forward pass
//! ([`eval_logits`](super::eval_logits)), with test-time flip and translation if asked. Images are
//! decoded in parallel, with the data module's decoder and its limits; one that cannot be read
//! is reported with the problem and the others are still classified.

use super::{eval_logits, EvalSettings};
use crate::config::{Config, Precision};
use crate::data::imagefolder::{list_images, load_image};
use crate::data::transforms::Transform;
use crate::model::Classifier;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// The image files to classify and the entries of folders that were skipped (with why).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub paths: Vec<PathBuf>,
    /// Entries of the folders' walks that were skipped: link loops, dangling links, too deep.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The image files named by `images` (a folder stands for every .jpg/.jpeg/.png file under it,
/// recursively, sorted) and by the lines of `list` (one path per line, the same way; empty lines
/// and lines starting with `#` are ignored), in that order. A path that is not a folder is kept
/// as a file whatever its name: reading it is the prediction's business.
pub fn gather_inputs(images: &[PathBuf], list: Option<&Path>) -> Result<Inputs> {
    let mut named: Vec<PathBuf> = images.to_vec();
    if let Some(list) = list {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("cannot read the list of images {}", list.display()))?;
        named.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(PathBuf::from),
        );
    }
    let mut inputs = Inputs::default();
    for p in named {
        if p.is_dir() {
            let (files, skipped) = list_images(&p)?;
            inputs.paths.extend(files);
            inputs.skipped.extend(skipped);
        } else {
            inputs.paths.push(p);
        }
    }
    if inputs.paths.is_empty() {
        bail!("no images to classify (the folders given hold no .jpg, .jpeg or .png files)");
    }
    Ok(inputs)
}

/// One of an image's top classes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassProbability {
    /// The class name stored in the checkpoint (its index, if the checkpoint has no names).
    pub class: String,
    /// Softmax probability of the (test-time augmented) logits.
    pub probability: f64,
}

/// The top classes of one image, most probable first.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub path: PathBuf,
    pub topk: Vec<ClassProbability>,
}

/// An image file that could not be read or decoded, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub path: PathBuf,
    /// The problem, naming the file.
    pub error: String,
}

/// How predictions are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictOptions {
    pub device: Device,
    /// Classes reported per image (clipped to the class count; at least 1).
    pub topk: usize,
    /// Test-time flip (default: the checkpoint's `train.eval_flip`).
    pub flip: Option<bool>,
    /// Test-time translation (default: the checkpoint's `train.eval_translate`).
    pub translate: Option<bool>,
    /// libtorch intra-op threads (0: every core of the machine, not the training run's
    /// `train.threads`, which was chosen for training beside other work).
    pub threads: usize,
}

/// A classification model loaded from its checkpoint, with its evaluation transform.
pub struct Predictor {
    model: Classifier,
    _vs: nn::VarStore,
    /// The checkpoint's embedded config.
    pub config: Config,
    /// One name per class (the checkpoint's, else the class indices).
    pub classes: Vec<String>,
    transform: Transform,
    settings: EvalSettings,
    topk: usize,
}

impl Predictor {
    /// Loads a classification checkpoint written by `tricks train`.
    pub fn load(checkpoint: &Path, opts: &PredictOptions) -> Result<Predictor> {
        let (model, vs, config, mut classes) = crate::model::load_model(checkpoint, opts.device)?;
        if classes.is_empty() {
            let n = model_classes(&model, &config, opts.device);
            classes = (0..n).map(|i| i.to_string()).collect();
        }
        crate::device::configure(opts.threads, opts.device, config.train.cudnn_benchmark);
        let settings = EvalSettings {
            device: opts.device,
            precision: Precision::Fp32,
            channels_last: false,
            flip: opts.flip.unwrap_or(config.train.eval_flip),
            translate: opts.translate.unwrap_or(config.train.eval_translate),
        };
        Ok(Predictor {
            model,
            _vs: vs,
            transform: Transform::new(&config.data),
            topk: opts.topk.clamp(1, classes.len().max(1)),
            classes,
            config,
            settings,
        })
    }

    /// Classes reported per image.
    pub fn topk(&self) -> usize {
        self.topk
    }

    /// How the forward pass runs (device, test-time flip and translation).
    pub fn settings(&self) -> EvalSettings {
        self.settings
    }

    /// The top classes of each of `images` (already through the evaluation transform: CHW f32,
    /// `3·val_size²` each), in one forward pass.
    fn predict_tensors(&self, images: &[Vec<f32>]) -> Result<Vec<Vec<ClassProbability>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.transform.cfg.val_size as i64;
        let flat: Vec<f32> = images.concat();
        let x = Tensor::from_slice(&flat)
            .view([images.len() as i64, 3, s, s])
            .to_device(self.settings.device);
        let probs = eval_logits(&self.model, &x, self.settings).softmax(1, Kind::Float);
        let (values, indices) = probs.topk(self.topk as i64, 1, true, true);
        let values: Vec<f32> = Vec::try_from(values.to_device(Device::Cpu).flatten(0, -1))?;
        let indices: Vec<i64> = Vec::try_from(indices.to_device(Device::Cpu).flatten(0, -1))?;
        Ok(values
            .chunks(self.topk)
            .zip(indices.chunks(self.topk))
            .map(|(v, i)| {
                v.iter()
                    .zip(i)
                    .map(|(&p, &c)| ClassProbability {
                        class: self
                            .classes
                            .get(c as usize)
                            .cloned()
                            .unwrap_or_else(|| c.to_string()),
                        // The f32's shortest decimal form, not its binary expansion in f64.
                        probability: p.to_string().parse().unwrap_or(p as f64),
                    })
                    .collect()
            })
            .collect())
    }

    /// Classifies image files in one batch (decoded in parallel): the predictions of those that
    /// could be read, in their order, and those that could not, with the problem.
    pub fn predict_files(&self, paths: &[PathBuf]) -> Result<(Vec<Prediction>, Vec<Unreadable>)> {
        let t = &self.transform;
        let decoded: Vec<std::result::Result<Vec<f32>, String>> = paths
            .par_iter()
            .map(|p| {
                load_image(p)
                    .map(|img| transformed(t, &img))
                    .map_err(|e| format!("{e:#}"))
            })
            .collect();
        let mut ok_paths = Vec::new();
        let mut tensors = Vec::new();
        let mut unreadable = Vec::new();
        for (path, d) in paths.iter().zip(decoded) {
            match d {
                Ok(x) => {
                    ok_paths.push(path.clone());
                    tensors.push(x);
                }
                Err(error) => unreadable.push(Unreadable {
                    path: path.clone(),
                    error,
                }),
            }
        }
        let predictions = self
            .predict_tensors(&tensors)?
            .into_iter()
            .zip(ok_paths)
            .map(|(topk, path)| Prediction { path, topk })
            .collect();
        Ok((predictions, unreadable))
    }
}

/// An image through the evaluation transform: CHW f32, normalised.
fn transformed(t: &Transform, img: &crate::data::Image) -> Vec<f32> {
    let mut out = vec![0f32; t.eval_len()];
    t.eval_into(img, &mut out);
    out
}

/// The model's number of outputs, from one forward pass of a blank image of the evaluation size.
fn model_classes(model: &Classifier, cfg: &Config, device: Device) -> usize {
    let s = cfg.data.val_size as i64;
    let x = Tensor::zeros([1, 3, s, s], (Kind::Float, device));
    let y = tch::no_grad(|| tch::nn::ModuleT::forward_t(model, &x, false));
    y.size()[1] as usize
}
