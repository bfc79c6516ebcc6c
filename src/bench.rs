//! `tricks bench`: training and inference img/s of a model on synthetic data, measured the same
//! way as bench/pytorch_bench.py (its PyTorch twin) so the two can be compared in one run.

use crate::config::{ModelConfig, OptimConfig, Precision};
use crate::device::{parse_device, to_channels_last, weights_to_channels_last};
use crate::model::{Classifier, AIRBENCH94};
use crate::train::optim::Optimizer;
use crate::train::precision::{check_supported, Autocast, LossScaler};
use anyhow::Result;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

pub struct BenchSpec {
    pub model: String,
    pub variant: String,
    pub batch: usize,
    pub size: i64,
    pub precision: String,
    pub channels_last: bool,
    pub device: String,
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    /// Measure the optimizer's per-tensor step instead of its flat-buffer step (the trainer's).
    pub per_tensor_optimizer: bool,
    /// `model.cifar_stem` (an ImageNet ResNet at CIFAR resolution, as `resnet18-tta.toml`).
    pub cifar_stem: bool,
    /// After the warm-up, take one step per command from stdin instead of timing a loop (see
    /// [`lockstep`]).
    pub lockstep: bool,
}

/// Runs the benchmark and returns its JSON line.
pub fn run(spec: &BenchSpec) -> Result<String> {
    let device = parse_device(&spec.device)?;
    let precision: Precision = spec.precision.parse()?;
    check_supported(precision, device)?;
    // Fixed shapes: cuDNN autotuning on, as in training by default.
    let threads = crate::device::configure(spec.threads, device, true);
    let mcfg = ModelConfig {
        name: spec.model.clone(),
        variant: spec.variant.clone(),
        cifar_stem: spec.cifar_stem,
        ..Default::default()
    };
    let classes = if spec.model.starts_with("cifar_") || spec.cifar_stem || spec.model == AIRBENCH94
    {
        10
    } else {
        1000
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    // airbench94's whitening conv keeps its random initial weights here (it is never trained, so
    // its values do not change the step's cost).
    let net = Classifier::new(&vs.root(), &mcfg, classes)?;
    if spec.channels_last {
        weights_to_channels_last(&vs);
    }
    let mut opt = Optimizer::new(&vs, &OptimConfig::default());
    if !spec.per_tensor_optimizer {
        opt.flatten();
    }
    let b = spec.batch as i64;
    let mut x = Tensor::randn([b, 3, spec.size, spec.size], (Kind::Float, device));
    if spec.channels_last {
        x = to_channels_last(&x);
    }
    let y = Tensor::randint(classes, [b], (Kind::Int64, device));
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // f16 trains through the trainer's dynamic loss scaler (bf16 and fp32 need none).
    let mut scaler = LossScaler::new(precision == Precision::Fp16, device);
    let mut train_step = || {
        let loss = {
            let _ac = Autocast::enter(precision, device);
            net.forward_t(&x, true).cross_entropy_for_logits(&y)
        };
        opt.zero_grad();
        scaler.scale_loss(&loss).backward();
        let found_inf = scaler.unscale(&opt.gradients());
        opt.step_unless(0.01, found_inf.as_ref());
        if let Some(found_inf) = &found_inf {
            scaler.update(found_inf);
        }
    };
    let infer = || {
        tch::no_grad(|| {
            let _ac = Autocast::enter(precision, device);
            net.forward_t(&x, false)
        })
    };
    if spec.lockstep {
        for _ in 0..spec.warmup {
            train_step();
            let _ = infer();
        }
        sync();
        lockstep(&mut train_step, &mut || drop(infer()), &sync)?;
        return Ok(serde_json::json!({"impl": "tricks", "lockstep": true}).to_string());
    }
    // With `--threads 0` on a CPU the thread count follows the cores other processes leave free
    // (device::IntraOpThreads): the warm-up then lasts until it has measured two windows, so
    // the timed steps run at the count a training would settle on.
    let mut adapting_step = || {
        train_step();
        if let Some(message) = threads.adapt() {
            eprintln!("{message}");
        }
    };
    let mut warm = 0;
    while warm < spec.warmup || threads.windows_measured() < 2 {
        adapting_step();
        warm += 1;
    }
    sync();
    let t = Instant::now();
    for _ in 0..spec.steps {
        adapting_step();
    }
    sync();
    let train_ips = (spec.steps * spec.batch) as f64 / t.elapsed().as_secs_f64();
    let ((), train_ops) = count_ops(&mut train_step);
    // The optimizer step alone (gradients left from the last backward pass).
    sync();
    let t = Instant::now();
    for _ in 0..spec.steps {
        opt.step(1e-6);
    }
    sync();
    let step_ms = 1e3 * t.elapsed().as_secs_f64() / spec.steps as f64;
    for _ in 0..spec.warmup {
        let _ = infer();
    }
    sync();
    let t = Instant::now();
    for _ in 0..spec.steps {
        let _ = infer();
    }
    sync();
    let infer_ips = (spec.steps * spec.batch) as f64 / t.elapsed().as_secs_f64();
    let (_, infer_ops) = count_ops(infer);
    Ok(serde_json::json!({
        "impl": "tricks",
        "model": spec.model,
        "variant": spec.variant,
        "cifar_stem": spec.cifar_stem,
        "batch": spec.batch,
        "size": spec.size,
        "precision": spec.precision,
        "loss_scaling": precision == Precision::Fp16,
        "channels_last": spec.channels_last,
        "device": spec.device,
        "threads": tch::get_num_threads(),
        "optimizer": if spec.per_tensor_optimizer { "per-tensor" } else { "flat" },
        "train_img_s": (train_ips * 10.0).round() / 10.0,
        "infer_img_s": (infer_ips * 10.0).round() / 10.0,
        "optimizer_step_ms": (step_ms * 1000.0).round() / 1000.0,
        "ops_per_train_step": train_ops,
        "ops_per_infer_step": infer_ops,
    })
    .to_string())
}

/// `tricks bench --lockstep`: for bench/lockstep.py, which runs this and bench/pytorch_bench.py
/// side by side and has them take turns, one step each, so that the speed of a shared machine,
/// which wanders by more than the difference being measured, is the same for both. Prints
/// `ready`, then reads one command per line: `train` or `infer` takes one step and prints its
/// milliseconds (device work included); the end of input ends it.
fn lockstep(train: &mut dyn FnMut(), infer: &mut dyn FnMut(), sync: &dyn Fn()) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let step: &mut dyn FnMut() = match line.trim() {
            "train" => train,
            "infer" => infer,
            other => anyhow::bail!("lockstep: unknown command {other:?} (train or infer)"),
        };
        let t = Instant::now();
        step();
        sync();
        writeln!(out, "{:.3}", 1e3 * t.elapsed().as_secs_f64())?;
        out.flush()?;
    }
    Ok(())
}

/// Runs `f` and counts the ATen operators it calls, on every thread, outermost calls only (a
/// convolution and the backend kernel it dispatches to count once). On a GPU each is at least one
/// kernel launch: the count is what bounds a small model there. Every thread's calls count (a
/// GPU's backward pass runs on the autograd engine's own thread), so nothing else may dispatch
/// operators meanwhile: not reentrant, and its tests run alone in `tests/ops_per_step.rs`.
pub fn count_ops<R>(f: impl FnOnce() -> R) -> (R, i64) {
    // SAFETY: plain C calls without arguments; the callback they install only counts.
    unsafe { crate::ffi::tricks_op_count_start() };
    let r = f();
    let n = unsafe { crate::ffi::tricks_op_count_stop() };
    (r, n)
}
