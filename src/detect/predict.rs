//! Using a trained detector: rebuilding it from its checkpoint, evaluating it on a dataset
//! (`tricks eval`), and the boxes of single images, drawn on the image with their class names
//! and scores or printed as JSON (`tricks predict`).

use super::loader;
use super::model::FasterRcnn;
use super::task::{evaluate, model_options, open_train_val, DetEval};
use crate::checkpoint;
use crate::config::{Config, Precision, Task};
use crate::data::imagefolder::load_image;
use crate::data::{Image, Shard};
use crate::model::ModelSpec;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;
use tch::{nn, Device, Kind};

/// A detector rebuilt from its checkpoint.
pub struct Detector {
    pub model: FasterRcnn,
    /// Keeps the weights alive.
    pub vs: nn::VarStore,
    pub cfg: Config,
    /// Class names; label k is `classes[k - 1]`.
    pub classes: Vec<String>,
    pub device: Device,
}

/// One detected object, in the image's pixel coordinates.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Box2d {
    pub class: String,
    pub score: f64,
    /// x1, y1, x2, y2.
    pub bbox: [f64; 4],
}

impl Detector {
    /// Loads a detection checkpoint (its embedded config names the architecture).
    pub fn load(path: &Path, device: Device) -> Result<Detector> {
        let ckpt = checkpoint::load(path)?;
        let cfg = match &ckpt.config {
            Some(c) if c.task == Task::Detection => c.clone(),
            Some(c) => bail!(
                "{}: a {:?} checkpoint, not a detection one",
                path.display(),
                c.task
            ),
            None => bail!(
                "{}: no embedded config, so the architecture is unknown",
                path.display()
            ),
        };
        if ckpt.classes.is_empty() {
            bail!("{}: the checkpoint stores no class names", path.display());
        }
        let vs = nn::VarStore::new(device);
        let spec = ModelSpec::from_config(&cfg.model)?;
        let model = FasterRcnn::new(
            &vs.root(),
            &spec,
            ckpt.classes.len() as i64 + 1,
            model_options(&cfg),
        )?;
        checkpoint::copy_into(&vs, &ckpt.tensors, path, None)?;
        Ok(Detector {
            model,
            vs,
            cfg,
            classes: ckpt.classes.clone(),
            device,
        })
    }

    /// The objects found in one decoded image, by decreasing score.
    pub fn detect(&self, img: &Image) -> Result<Vec<Box2d>> {
        let x = super::transforms::to_tensor(img).to_device(self.device);
        let dets = tch::no_grad(|| self.model.detect(&[x]));
        let d = dets
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no output"))?;
        let b = Vec::<f64>::try_from(d.boxes.to_kind(Kind::Double).flatten(0, -1))?;
        let s = Vec::<f64>::try_from(d.scores.to_kind(Kind::Double))?;
        let l = Vec::<i64>::try_from(d.labels.to_kind(Kind::Int64))?;
        (0..s.len())
            .map(|i| {
                let class = self
                    .classes
                    .get((l[i] - 1) as usize)
                    .ok_or_else(|| anyhow!("label {} outside the checkpoint's classes", l[i]))?;
                Ok(Box2d {
                    class: class.clone(),
                    score: s[i],
                    bbox: [b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]],
                })
            })
            .collect()
    }
}

/// Evaluates a detection checkpoint on its dataset's validation split (or on the dataset at
/// `data`, in the checkpoint's format and split names), with COCO's protocol, in batches of its
/// config's `detect.eval_batch_size`: images are padded to the largest of their batch, which
/// moves the features near the edges of the smaller ones (as in torchvision), so the figures
/// are the training run's own only with its batches.
pub fn evaluate_checkpoint(
    path: &Path,
    data: Option<&str>,
    split: Option<&str>,
    device: Device,
) -> Result<(DetEval, Config)> {
    let d = Detector::load(path, device)?;
    let mut cfg = d.cfg.clone();
    if let Some(dir) = data {
        cfg.data.dir = dir.to_string();
    }
    if let Some(split) = split {
        cfg.detect.val_split = split.to_string();
    }
    let (_, val) = open_train_val(&cfg)?;
    if val.classes != d.classes {
        bail!(
            "{}: the dataset's {} classes differ from the checkpoint's {}",
            cfg.data.dir,
            val.classes.len(),
            d.classes.len()
        );
    }
    let opts = loader::LoaderOptions {
        batch_size: cfg.detect.eval_batch_size,
        workers: cfg.data.workers,
        hflip_prob: 0.0,
        min_sizes: cfg.detect.min_size.clone(),
        crop: None,
    };
    let batches = loader::eval_loader(val.clone(), &opts, Shard { rank: 0, world: 1 });
    let e = evaluate(&d.model, batches, &val, device, Precision::Fp32, None)?;
    Ok((e, cfg))
}

/// Detects the objects of `image` and, when `out` is given, writes the image with their boxes,
/// class names and scores drawn on it (PNG or JPEG by extension).
pub fn predict_image(
    detector: &Detector,
    image: &Path,
    out: Option<&Path>,
) -> Result<(Vec<Box2d>, (u32, u32))> {
    let img = load_image(image)?;
    let boxes = detector.detect(&img)?;
    if let Some(out) = out {
        draw_boxes(&img, &boxes, &detector.classes, out)?;
    }
    Ok((boxes, (img.width, img.height)))
}

/// Writes `img` with `boxes` drawn on it: a rectangle per box in its class's colour, the class
/// name and score above it.
pub fn draw_boxes(img: &Image, boxes: &[Box2d], classes: &[String], out: &Path) -> Result<()> {
    crate::draw::register_font()?;
    let (w, h) = (img.width, img.height);
    let mut buf = img.rgb.clone();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let font_px = ((w.min(h) as f64) / 30.0).clamp(10.0, 24.0).round() as i32 & !1;
        let thickness = ((w.min(h) as f64) / 250.0).ceil().max(1.0) as u32;
        for b in boxes {
            let k = classes.iter().position(|c| *c == b.class).unwrap_or(0);
            let colour = crate::draw::color(k);
            let [x1, y1, x2, y2] = b.bbox.map(|v| v.round() as i32);
            root.draw(&Rectangle::new(
                [(x1, y1), (x2, y2)],
                colour.stroke_width(thickness),
            ))
            .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
            let label = format!("{} {:.2}", b.class, b.score);
            let style = TextStyle::from((crate::draw::FAMILY, font_px).into_font()).color(&WHITE);
            let (tw, th) = root
                .estimate_text_size(&label, &style)
                .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
            let top = (y1 - th as i32 - 2).max(0);
            root.draw(&Rectangle::new(
                [(x1, top), (x1 + tw as i32 + 4, top + th as i32 + 2)],
                colour.filled(),
            ))
            .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
            root.draw(&Text::new(label, (x1 + 2, top + 1), style))
                .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
        }
        root.present()
            .map_err(|e| anyhow!("drawing failed: {e:?}"))?;
    }
    let rgb = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("bad image buffer"))?;
    rgb.save(out)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// The boxes of one image as a JSON object (`tricks predict --json`).
pub fn boxes_json(image: &Path, size: (u32, u32), boxes: &[Box2d]) -> serde_json::Value {
    serde_json::json!({
        "path": image.to_string_lossy(),
        "width": size.0,
        "height": size.1,
        "detections": boxes,
    })
}
