//! Using a trained segmentation checkpoint: rebuilding its model,
//! evaluating it on a dataset, and colourised predictions of single images.

use super::dataset::open_split;
use super::loader::SegLoader;
use super::model::SegModel;
use super::task::{evaluate, SegEval};
use crate::checkpoint;
use crate::config::{Config, Precision, Task};
use crate::data::imagefolder::load_image;
use crate::data::Split;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Rebuilds a segmentation model from its checkpoint (embedded config) and loads its weights.
pub fn load_model(path: &Path, device: Device) -> Result<(SegModel, nn::VarStore, Config)> {
    let ckpt = checkpoint::load(path)?;
    let cfg = match &ckpt.config {
        Some(c) if c.task == Task::Segmentation => c.clone(),
        Some(_) => bail!(
            "{}: a classification checkpoint, not a segmentation one",
            path.display()
        ),
        None => bail!(
            "{}: no embedded config, so the architecture is unknown",
            path.display()
        ),
    };
    let vs = nn::VarStore::new(device);
    let model = SegModel::new(&vs.root(), &cfg)?;
    checkpoint::copy_into(&vs, &ckpt.tensors, path, None)?;
    Ok((model, vs, cfg))
}

/// Evaluates a segmentation checkpoint on the `val/` (or `test/`) split of `data` (default: the
/// checkpoint's `data.dir`), full images, fp32. Returns the evaluation and the config.
pub fn evaluate_checkpoint(
    path: &Path,
    data: Option<&str>,
    device: Device,
    batch_size: usize,
) -> Result<(SegEval, Config)> {
    let (model, _vs, mut cfg) = load_model(path, device)?;
    if let Some(d) = data {
        cfg.data.dir = d.to_string();
    }
    cfg.data.val_limit = 0;
    cfg.data.cache = false;
    crate::device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);
    let ds = open_split(&cfg, Split::Val)?;
    let loader = SegLoader::eval(ds, &cfg, batch_size.max(1));
    let e = evaluate(
        &model,
        loader,
        device,
        Precision::Fp32,
        false,
        cfg.segment.ignore_index,
    )?;
    Ok((e, cfg))
}

/// CamVid's 11-class colours (SegNet order: Sky, Building, Pole, Road, Pavement, Tree,
/// SignSymbol, Fence, Car, Pedestrian, Bicyclist).
pub const CAMVID_PALETTE: [[u8; 3]; 11] = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
];

/// A fixed colour per class: CamVid's for 11 classes, else the PASCAL VOC colour map (bit
/// interleaving of the class id; class 0 is black).
pub fn palette(num_classes: usize) -> Vec<[u8; 3]> {
    if num_classes == CAMVID_PALETTE.len() {
        return CAMVID_PALETTE.to_vec();
    }
    (0..num_classes)
        .map(|i| {
            let (mut c, mut rgb) = (i, [0u8; 3]);
            for j in 0..8 {
                for (k, v) in rgb.iter_mut().enumerate() {
                    *v |= (((c >> k) & 1) as u8) << (7 - j);
                }
                c >>= 3;
            }
            rgb
        })
        .collect()
}

/// A prediction of one image.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub width: u32,
    pub height: u32,
    /// Class id per pixel, row-major.
    pub classes: Vec<u8>,
    /// Pixels per class.
    pub counts: Vec<usize>,
}

impl Prediction {
    /// The prediction as RGB, a palette colour per class.
    pub fn colourise(&self, palette: &[[u8; 3]]) -> Vec<u8> {
        self.classes
            .iter()
            .flat_map(|&c| palette.get(c as usize).copied().unwrap_or([0, 0, 0]))
            .collect()
    }
}

/// Predicts the classes of one image file at its own size with a loaded model.
pub fn predict(model: &SegModel, cfg: &Config, image: &Path, device: Device) -> Result<Prediction> {
    let img = load_image(image)?;
    let t = super::transforms::JointTransform::new(cfg);
    let mut x = vec![0f32; 3 * img.width as usize * img.height as usize];
    t.normalize_into(&img, &mut x);
    let x = Tensor::from_slice(&x)
        .view([1, 3, img.height as i64, img.width as i64])
        .to_device(device);
    let pred = tch::no_grad(|| model.forward_t(&x, false))
        .argmax(1, false)
        .to_kind(Kind::Uint8)
        .to_device(Device::Cpu);
    let classes: Vec<u8> = Vec::try_from(pred.flatten(0, -1)).context("prediction to bytes")?;
    let mut counts = vec![0usize; model.num_classes as usize];
    for &c in &classes {
        counts[c as usize] += 1;
    }
    Ok(Prediction {
        width: img.width,
        height: img.height,
        classes,
        counts,
    })
}

/// `tricks predict`: loads the checkpoint, predicts `image` and writes the colourised mask to
/// `out` (PNG). Returns the prediction and the class names.
pub fn predict_image(
    checkpoint_path: &Path,
    image: &Path,
    out: &Path,
    device: Device,
) -> Result<(Prediction, Vec<String>)> {
    let (model, _vs, cfg) = load_model(checkpoint_path, device)?;
    let p = predict(&model, &cfg, image, device)?;
    let rgb = p.colourise(&palette(model.num_classes as usize));
    let mut bytes = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut bytes),
        &rgb,
        p.width,
        p.height,
        image::ExtendedColorType::Rgb8,
    )
    .context("PNG encoding failed")?;
    checkpoint::write_atomic(out, &bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok((p, super::class_names(&cfg)))
}
