//! `tricks export`: a trained classification or segmentation network as a TorchScript module that
//! PyTorch (`torch.jit.load`) and libtorch's C++ API (`torch::jit::load`) run without `tricks`,
//! with a JSON file beside it that says what goes in and what comes out.
//!
//! The module is the network in evaluation mode, traced by libtorch's tracer on one input of the
//! exported shape, with the normalisation inside: it takes RGB images as float32 NCHW in [0, 1]
//! (what torchvision's `ToTensor` gives) and returns float32 logits. The weights are inlined as
//! constants, as `torch.jit.freeze` makes an inference module: `torch.jit.load(f,
//! map_location=…)` places them. Tracing records shapes that the Rust code read as numbers (the
//! segmentation head's upsampling to the input size), so the module is for the exported image
//! size; the batch size may differ where the network does not fix it (checked by the tests for
//! the ResNet family). Detection checkpoints are refused: their post-processing (score filter,
//! NMS) has data-dependent shapes that a trace cannot record.

use crate::config::{Config, Pipeline, Precision, Task};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::nn::ModuleT;
use tch::{CModule, Device, Kind, Tensor};

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportOptions {
    /// Input (width, height); default: the checkpoint's evaluation size (classification,
    /// `data.val_size`) or training crop (segmentation, `segment.crop_size`).
    pub size: Option<(i64, i64)>,
    /// Batch size of the traced input.
    pub batch: i64,
    /// fp32, or bf16 weights and activations (logits still float32).
    pub precision: Precision,
    /// Where the module is traced (and so where its constants live).
    pub device: Device,
}

/// The JSON written beside the module: everything a server needs to feed it and read it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    pub format: &'static str,
    /// The module's file name (beside this JSON).
    pub file: String,
    pub task: &'static str,
    pub model: String,
    pub variant: String,
    pub precision: &'static str,
    pub device: String,
    pub input: InputSpec,
    /// What to do to an image before it becomes the input (the checkpoint's evaluation transform).
    pub preprocessing: Preprocessing,
    /// The normalisation the module applies itself (do not apply it again).
    pub normalisation_inside: Normalisation,
    pub output: OutputSpec,
    /// One name per output channel, in order.
    pub classes: Vec<String>,
    /// The checkpoint the module was exported from.
    pub checkpoint: String,
    /// Largest |module − tricks| over the traced input, checked after loading the written file
    /// back through libtorch's `torch::jit::load`.
    pub check_max_abs_diff: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputSpec {
    /// [batch, 3, height, width].
    pub shape: [i64; 4],
    pub dtype: &'static str,
    pub range: [f64; 2],
    pub layout: &'static str,
    pub channels: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Preprocessing {
    /// Resize so that the shorter side is this long (aspect kept), then centre-crop `crop`;
    /// `None`: resize the whole image to the input size.
    pub resize_shorter_side: Option<u32>,
    /// Side of the centre crop (classification).
    pub center_crop: Option<u32>,
    pub interpolation: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Normalisation {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputSpec {
    pub shape: Vec<i64>,
    pub dtype: &'static str,
    /// What the values are: raw logits (softmax over dimension 1 gives probabilities).
    pub meaning: &'static str,
}

/// The JSON's path for a module written to `out`: the same name with `.json`.
pub fn info_path(out: &Path) -> PathBuf {
    out.with_extension("json")
}

/// Exports `checkpoint` to `out` (TorchScript) and `out` with `.json` (see the module docs):
/// check the request, load the network, trace it, write the module only if it reloads and agrees,
/// then describe it in the JSON.
pub fn export(checkpoint: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportInfo> {
    let precision = check_request(opts)?;
    let task = crate::checkpoint::task_of(checkpoint);
    let Loaded {
        network,
        mut vs,
        cfg,
        classes,
    } = load_network(checkpoint, task, opts.device)?;
    // The fused CPU batch norm of csrc/ is not a libtorch operator: the tracer would not see it.
    crate::model::norm::set_fused_batch_norm(false);
    // Weights become constants of the graph; the tracer refuses tensors that require gradients.
    vs.freeze();
    if opts.precision == Precision::Bf16 {
        vs.bfloat16();
    }
    let (width, height) = opts.size.unwrap_or_else(|| default_size(&cfg, task));
    let shape = [opts.batch, 3, height, width];
    let traced = trace(network.as_ref(), &cfg, shape, opts)?;
    let diff = write_checked(&traced, out, opts)?;
    let expected = &traced.expected;
    let (mean, std) = (cfg.data.mean, cfg.data.std);
    let info = ExportInfo {
        format: "torchscript",
        file: out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        task: match task {
            Task::Segmentation => "segmentation",
            _ => "classification",
        },
        model: cfg.model.name.clone(),
        variant: cfg.model.variant.clone(),
        precision,
        device: format!("{:?}", opts.device).to_lowercase(),
        input: InputSpec {
            shape,
            dtype: "float32",
            range: [0.0, 1.0],
            layout: "NCHW",
            channels: "RGB",
        },
        preprocessing: preprocessing(&cfg, task, (width, height)),
        normalisation_inside: Normalisation { mean, std },
        output: OutputSpec {
            shape: expected.size(),
            dtype: "float32",
            meaning: match task {
                Task::Segmentation => "per-pixel class logits at the input size (argmax over dimension 1 gives the class map)",
                _ => "class logits (softmax over dimension 1 gives probabilities)",
            },
        },
        classes: if classes.is_empty() {
            (0..expected.size()[1]).map(|i| i.to_string()).collect()
        } else {
            classes
        },
        checkpoint: checkpoint.display().to_string(),
        check_max_abs_diff: diff,
    };
    let json = serde_json::to_string_pretty(&info)? + "\n";
    let json_path = info_path(out);
    crate::checkpoint::write_atomic(&json_path, json.as_bytes())
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(info)
}

/// Refuses what export does not offer, before anything is loaded; the precision's name.
fn check_request(opts: &ExportOptions) -> Result<&'static str> {
    if opts.batch < 1 {
        bail!("--batch must be at least 1, not {}", opts.batch);
    }
    let precision = match opts.precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => bail!("--precision fp16 is not offered: export fp32 or bf16"),
    };
    if let Some((w, h)) = opts.size {
        if w < 8 || h < 8 {
            bail!("--size {w}x{h} is too small: at least 8 pixels a side");
        }
    }
    Ok(precision)
}

/// A checkpoint's network with its weights, config and class names.
struct Loaded {
    network: Box<dyn ModuleT>,
    vs: tch::nn::VarStore,
    cfg: Config,
    classes: Vec<String>,
}

/// A classification or segmentation checkpoint's network; a detection checkpoint is refused with
/// the reason.
fn load_network(checkpoint: &Path, task: Task, device: Device) -> Result<Loaded> {
    match task {
        Task::Classification => {
            let (m, vs, cfg, classes) = crate::model::load_model(checkpoint, device)?;
            Ok(Loaded {
                network: Box::new(m),
                vs,
                cfg,
                classes,
            })
        }
        Task::Segmentation => {
            let (m, vs, cfg) = crate::segment::load_model(checkpoint, device)?;
            let classes = crate::segment::class_names(&cfg);
            Ok(Loaded {
                network: Box::new(m),
                vs,
                cfg,
                classes,
            })
        }
        Task::Detection => bail!(
            "{}: a detection checkpoint; export takes classification and segmentation checkpoints \
             (a detector's score filter and NMS have data-dependent shapes that a trace cannot \
             record; use `tricks predict` or `tricks eval`)",
            checkpoint.display()
        ),
    }
}

/// The traced module, the fixed input it was traced on and tricks' own output for that input.
struct Traced {
    module: CModule,
    input: Tensor,
    expected: Tensor,
}

/// Traces normalisation + `network` (+ the casts of bf16) on a fixed seeded input in [0, 1].
fn trace(
    network: &dyn ModuleT,
    cfg: &Config,
    shape: [i64; 4],
    opts: &ExportOptions,
) -> Result<Traced> {
    let stats = |v: [f64; 3]| {
        Tensor::from_slice(&v.map(|x| x as f32))
            .view([1, 3, 1, 1])
            .to_device(opts.device)
    };
    let (mean_t, std_t) = (stats(cfg.data.mean), stats(cfg.data.std));
    let forward = |x: &Tensor| -> Tensor {
        let x = (x - &mean_t) / &std_t;
        let x = match opts.precision {
            Precision::Bf16 => x.to_kind(Kind::BFloat16),
            _ => x,
        };
        network.forward_t(&x, false).to_kind(Kind::Float)
    };
    // A fixed input (seeded), in [0, 1], also used for the check after writing.
    tch::manual_seed(0);
    let input = Tensor::rand(shape, (Kind::Float, Device::Cpu)).to_device(opts.device);
    tch::no_grad(|| -> Result<Traced> {
        let expected = forward(&input);
        let module = CModule::create_by_tracing(
            "TricksExport",
            "forward",
            &[input.shallow_clone()],
            &mut |xs| vec![forward(&xs[0])],
        )
        .context("tracing the network failed")?;
        Ok(Traced {
            module,
            input: input.shallow_clone(),
            expected,
        })
    })
}

/// Writes the module beside `out`, loads it back, runs it on the traced input and renames it to
/// `out` only if it agrees with tricks' output (an interrupted or wrong export never leaves a
/// module behind); the largest difference.
fn write_checked(traced: &Traced, out: &Path, opts: &ExportOptions) -> Result<f64> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let tmp = out.with_extension(format!("pt.tmp.{}", std::process::id()));
    traced
        .module
        .save(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let checked = check_written(&tmp, traced, opts);
    if checked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let diff = checked?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(diff)
}

/// The written module at `tmp` against tricks' output: the largest difference, or an error when
/// it does not load, does not run or disagrees.
fn check_written(tmp: &Path, traced: &Traced, opts: &ExportOptions) -> Result<f64> {
    let module = CModule::load_on_device(tmp, opts.device)
        .with_context(|| format!("cannot load back {}", tmp.display()))?;
    let got = tch::no_grad(|| module.forward_ts(&[&traced.input]))
        .context("the written module does not run")?;
    let expected = &traced.expected;
    let diff = if got.size() == expected.size() {
        f64::try_from((&got - expected).abs().max())?
    } else {
        f64::INFINITY
    };
    let tolerance = match opts.precision {
        Precision::Fp32 => 1e-4,
        _ => 1e-2,
    };
    if diff > tolerance * (1.0 + f64::try_from(expected.abs().max())?) {
        bail!(
            "the traced module disagrees with tricks' forward pass (max |difference| {diff}, output {:?} against {:?}); nothing written",
            got.size(),
            expected.size()
        );
    }
    Ok(diff)
}

/// The input size when `--size` is not given: (width, height).
fn default_size(cfg: &Config, task: Task) -> (i64, i64) {
    let s = match task {
        Task::Segmentation => cfg.segment.crop_size,
        _ => cfg.data.val_size,
    } as i64;
    (s, s)
}

/// The evaluation transform of the checkpoint for an input of `(width, height)`, in words a
/// server can follow.
fn preprocessing(cfg: &Config, task: Task, (width, height): (i64, i64)) -> Preprocessing {
    const BILINEAR: &str = "bilinear, antialiased when downscaling (PIL's BILINEAR)";
    // Segmentation predicts whole images; a CIFAR model takes its images as they are; a
    // non-square input has no centre crop of the checkpoint's shape.
    if task == Task::Segmentation || cfg.data.pipeline == Pipeline::Cifar || width != height {
        return Preprocessing {
            resize_shorter_side: None,
            center_crop: None,
            interpolation: BILINEAR,
        };
    }
    Preprocessing {
        resize_shorter_side: Some((width as f64 / cfg.data.val_crop_ratio).round() as u32),
        center_crop: Some(width as u32),
        interpolation: BILINEAR,
    }
}

/// Parses `--size`: `N` (square) or `WxH`.
pub fn parse_size(s: &str) -> Result<(i64, i64), String> {
    let num = |t: &str| {
        t.trim().parse::<i64>().map_err(|_| {
            format!("`{s}` is not a size: give N or WIDTHxHEIGHT, e.g. 224 or 480x360")
        })
    };
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((num(w)?, num(h)?)),
        None => {
            let n = num(s)?;
            Ok((n, n))
        }
    }
}
