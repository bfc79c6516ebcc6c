//! The `tricks` command line: a thin layer over the library.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tricks::config::Config;
use tricks::{classify, data, device, engine, train};

#[derive(Parser)]
#[command(
    name = "tricks",
    version,
    about = "Train ResNet image classifiers with the Bag of Tricks (He et al. 2019)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a config file.
    Train(TrainArgs),
    /// Fine-tune a trained checkpoint on new data: `train` with `finetune.from` set.
    Finetune {
        /// Checkpoint to start from (this project's or converted timm/torchvision safetensors).
        #[arg(long)]
        from: String,
        /// Train only the new classifier (frozen backbone, BN in eval mode).
        #[arg(long)]
        linear_probe: bool,
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Evaluate a checkpoint: top-1, top-5 and loss on the evaluation split (pixel accuracy and
    /// mIoU for a segmentation checkpoint, COCO mAP and per-class AP for a detection one).
    Eval(EvalArgs),
    /// Classify images with a classification checkpoint (top classes and probabilities), or
    /// segment one image with a segmentation checkpoint (writes the colourised mask, PNG).
    Predict(PredictArgs),
    /// Write a classification or segmentation checkpoint as a TorchScript module (PyTorch's
    /// `torch.jit.load`, libtorch's `torch::jit::load`) and a JSON of its input, preprocessing,
    /// output and class names beside it.
    Export(ExportArgs),
    /// Print versions, threads and CUDA/cuDNN availability.
    Info,
    /// Download the official CIFAR-10/100 binary archive.
    Download {
        /// "cifar10" or "cifar100".
        dataset: String,
        /// Folder to extract into.
        #[arg(long, default_value = "data-local")]
        out: PathBuf,
    },
    /// Measure training and inference img/s on synthetic data (prints one JSON line).
    Bench(BenchArgs),
    /// Run an ablation study: variants x seeds, then the table, CSV and plots.
    Ablate(AblateArgs),
    /// Regenerate a study's table, CSV and plots from its finished runs.
    Report {
        /// The study's output folder.
        dir: PathBuf,
    },
    /// Start the data-parallel ranks of a run on this machine (like torchrun), e.g.
    /// `tricks launch --nproc 2 -- train --config FILE`.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    /// Processes (ranks) on this machine.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Machines in the run.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index among them (0 hosts the rendezvous).
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of machine 0, reachable from every machine.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rendezvous port (default: a free port; required with several machines).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the ranks get to checkpoint and exit once stopped, before they are killed.
    #[arg(long, default_value_t = 60.0)]
    grace: f64,
    /// The tricks command every rank runs (after `--`).
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

#[derive(Args)]
struct AblateArgs {
    /// Study file (TOML; see studies/).
    #[arg(long)]
    study: PathBuf,
    /// Output folder of the study.
    #[arg(long)]
    out: PathBuf,
    /// Trainings at once (1 or more).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    jobs: usize,
    /// cpu, cuda, cuda:N or auto (default: the study's `device`, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Override a config key in every variant, after the study's own `overrides` (a variant's
    /// own overrides still apply), e.g. --set train.precision=bf16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Seeds of every variant in place of the study's `seeds`, e.g. --seeds 1,2,3.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    seeds: Option<Vec<u64>>,
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Dataset root (overrides `data.dir`).
    #[arg(long)]
    data: Option<String>,
    /// Output folder (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Override a config key, e.g. --set optim.lr=0.2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Validate the config and the data folder, then exit without training.
    #[arg(long)]
    check: bool,
    /// Continue the run in --out from its newest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Skip unreadable images instead of stopping (same as --set data.skip_bad_images=true).
    #[arg(long)]
    skip_bad_images: bool,
    /// No progress bars (epoch lines only).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint written by `tricks train` (epoch-*.safetensors or best.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset root; its `val/` (or `test/`) split is evaluated (for detection, the
    /// checkpoint's `detect.val_split`). Default: the checkpoint's `data.dir`.
    #[arg(long)]
    data: Option<String>,
    /// Detection: the split to evaluate instead of the checkpoint's `detect.val_split` (e.g.
    /// `train2017`, to see how well the detector fits its training images).
    #[arg(long)]
    split: Option<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Images per batch (classification and segmentation; a detection checkpoint is evaluated
    /// in batches of its `detect.eval_batch_size`, which its figures depend on).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// fp32, bf16 or fp16 (autocast). With the training's precision and layout, the figures are
    /// those its validation wrote to metrics.jsonl.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Run the model in channels_last layout.
    #[arg(long)]
    channels_last: bool,
    /// Test-time flip augmentation (true/false): score the mean logits of each image and its
    /// mirror image. Default: the checkpoint's `train.eval_flip`.
    #[arg(long)]
    flip: Option<bool>,
    /// Test-time translation (true/false): ½ the logits of each image plus ¼ each of its copies
    /// shifted one pixel up-left and down-right. Default: the checkpoint's `train.eval_translate`.
    #[arg(long)]
    translate: Option<bool>,
}

#[derive(Args)]
struct ExportArgs {
    /// A classification or segmentation checkpoint written by `tricks train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The TorchScript file to write (the JSON goes beside it, with `.json`).
    #[arg(long)]
    out: PathBuf,
    /// Input size, N or WIDTHxHEIGHT (default: the checkpoint's evaluation size; segmentation:
    /// its training crop). The module is traced for this size.
    #[arg(long, value_parser = tricks::export::parse_size)]
    size: Option<(i64, i64)>,
    /// Batch size of the traced input.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    batch: i64,
    /// fp32 or bf16 (weights and activations; the logits stay float32).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Where to trace (the module's weights live there): cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct PredictArgs {
    /// A checkpoint written by `tricks train`: classification (prints the top classes of each
    /// image) or segmentation (writes the colourised mask of one image to --out).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image file (JPEG or PNG), or a folder: every image under it, recursively (repeatable).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// A text file of image paths (or folders), one per line (classification).
    #[arg(long)]
    list: Option<PathBuf>,
    /// Segmentation: output PNG, one palette colour per class (CamVid's colours for 11 classes).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Classes printed per image (clipped to the class count).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    topk: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    batch_size: usize,
    /// Test-time flip (true/false). Default: the checkpoint's `train.eval_flip`.
    #[arg(long)]
    flip: Option<bool>,
    /// Test-time translation (true/false). Default: the checkpoint's `train.eval_translate`.
    #[arg(long)]
    translate: Option<bool>,
    /// One JSON object per image and line: {"path", "topk": [{"class", "probability"}]}.
    #[arg(long)]
    json: bool,
    /// Also write the predictions to a CSV file: path, then class and probability of each of the
    /// top k.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// libtorch threads for the forward passes (0: every core; images decode on every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct BenchArgs {
    /// A ResNet (resnet18..152, cifar_resnet20/56/110), a ResNeXt or SE-ResNet (resnext50_32x4d,
    /// seresnet50, seresnext50_32x4d, ...) or airbench94 (32 px, 10 classes).
    #[arg(long, default_value = "cifar_resnet20")]
    model: String,
    #[arg(long, default_value = "a")]
    variant: String,
    /// Images per step (1 or more).
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    batch: usize,
    #[arg(long, default_value_t = 32)]
    size: i64,
    /// fp32, bf16 or fp16.
    #[arg(long, default_value = "fp32")]
    precision: String,
    #[arg(long)]
    channels_last: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Step the optimizer tensor by tensor (the trainer uses one flat buffer): for comparison.
    #[arg(long)]
    per_tensor_optimizer: bool,
    /// An ImageNet ResNet with the full-resolution stem (`model.cifar_stem`), 10 classes.
    #[arg(long)]
    cifar_stem: bool,
    /// After the warm-up, take one step per line of stdin (`train` or `infer`) and print its
    /// milliseconds: bench/lockstep.py alternates this with PyTorch step by step.
    #[arg(long)]
    lockstep: bool,
}

/// A count that must be 1 or more (`--batch`, `--jobs`).
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(n) => Err(format!("{n} is not allowed: the valid range is 1 or more")),
        Err(e) => Err(format!("{e} (the valid range is 1 or more)")),
    }
}

fn main() {
    let cli = Cli::parse();
    // Ok(code): the exit status (0, or 130/143 for a run a signal stopped after its checkpoint).
    let result: Result<i32> = match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Finetune {
            from,
            linear_probe,
            mut train,
        } => {
            // A dense task's backbone comes from the checkpoint; classification loads it all.
            let key = match config_task(&train.config) {
                tricks::config::Task::Detection => "detect.backbone",
                tricks::config::Task::Segmentation => "segment.backbone",
                tricks::config::Task::Classification => "finetune.from",
            };
            train
                .overrides
                .insert(0, format!("{key}={}", toml::Value::String(from)));
            if linear_probe {
                train
                    .overrides
                    .insert(1, "finetune.mode=\"linear_probe\"".to_string());
            }
            cmd_train(train)
        }
        Command::Eval(a) => cmd_eval(a).map(|()| 0),
        Command::Predict(a) => cmd_predict(a),
        Command::Export(a) => cmd_export(a).map(|()| 0),
        Command::Info => cmd_info().map(|()| 0),
        Command::Download { dataset, out } => {
            data::download::download_cifar(&dataset, &out).map(|dir| {
                println!("CIFAR binary files are in {}", dir.display());
                println!(
                    "train with: tricks train --config configs/cifar10/resnet20.toml --data {}",
                    dir.display()
                );
                0
            })
        }
        Command::Bench(a) => tricks::bench::run(&tricks::bench::BenchSpec {
            model: a.model,
            variant: a.variant,
            batch: a.batch,
            size: a.size,
            precision: a.precision,
            channels_last: a.channels_last,
            device: a.device,
            steps: a.steps,
            warmup: a.warmup,
            threads: a.threads,
            per_tensor_optimizer: a.per_tensor_optimizer,
            cifar_stem: a.cifar_stem,
            lockstep: a.lockstep,
        })
        .map(|line| {
            println!("{line}");
            0
        }),
        Command::Ablate(a) => cmd_ablate(a),
        Command::Report { dir } => tricks::experiments::report(&dir).map(|()| {
            println!("table, CSV and plots regenerated in {}", dir.display());
            0
        }),
        Command::Launch(a) => cmd_launch(a),
    };
    match result {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // A huge value (a 10 MB config string) is cut, so the error stays one readable line.
            let msg = tricks::config::shorten_message(&format!("{e:#}"));
            match std::env::var("RANK") {
                Ok(r) if std::env::var("WORLD_SIZE").is_ok() => {
                    eprintln!("error: rank {r}: {msg}")
                }
                _ => eprintln!("error: {msg}"),
            }
            std::process::exit(1);
        }
    }
}

/// SIGINT/SIGTERM: `stop` is set (the trainer finishes its step, checkpoints and stops) and the
/// signal recorded, for the exit status. A second signal while stopping exits at once (128 +
/// the signal's number).
struct Signals {
    stop: Arc<AtomicBool>,
    sigint: Arc<AtomicBool>,
    sigterm: Arc<AtomicBool>,
}

impl Signals {
    /// With `exit_on_second`, a second signal exits at once.
    fn install(exit_on_second: bool) -> Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let s = Signals {
            stop: Arc::new(AtomicBool::new(false)),
            sigint: Arc::new(AtomicBool::new(false)),
            sigterm: Arc::new(AtomicBool::new(false)),
        };
        for (sig, seen) in [(SIGINT, &s.sigint), (SIGTERM, &s.sigterm)] {
            if exit_on_second {
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, s.stop.clone())
                    .context("cannot install the signal handler")?;
            }
            signal_hook::flag::register(sig, seen.clone())
                .context("cannot install the signal handler")?;
            signal_hook::flag::register(sig, s.stop.clone())
                .context("cannot install the signal handler")?;
        }
        Ok(s)
    }

    /// The exit status of a command that `stopped` (the run returned early): 130 after SIGINT,
    /// 143 after SIGTERM, 0 when no signal stopped it (`train.max_steps`).
    fn exit_code(&self, stopped: bool) -> i32 {
        if !stopped {
            0
        } else if self.sigint.load(Ordering::SeqCst) {
            128 + signal_hook::consts::SIGINT
        } else if self.sigterm.load(Ordering::SeqCst) {
            128 + signal_hook::consts::SIGTERM
        } else {
            0
        }
    }
}

/// The `task` a config file names (classification when unreadable: loading it reports why).
fn config_task(path: &Path) -> tricks::config::Task {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("task")?.as_str().map(str::to_string))
        .and_then(|t| toml::Value::String(t).try_into().ok())
        .unwrap_or_default()
}

fn load_config(a: &TrainArgs) -> Result<Config> {
    let mut overrides = Vec::new();
    if let Some(d) = &a.data {
        overrides.push(format!("data.dir={}", toml::Value::String(d.clone())));
    }
    if a.skip_bad_images {
        overrides.push("data.skip_bad_images=true".to_string());
    }
    overrides.extend(a.overrides.iter().cloned());
    tricks::recipe::load(&a.config, &overrides)
}

fn cmd_train(a: TrainArgs) -> Result<i32> {
    let cfg = load_config(&a)?;
    // Every rank of a data-parallel run reads the same config: rank 0 alone says so.
    if !matches!(std::env::var("RANK"), Ok(r) if r != "0") {
        for w in cfg.warnings() {
            eprintln!("warning: {w}");
        }
    }
    let device = device::parse_device(&a.device)?;
    let out = a.out.clone().unwrap_or_else(|| {
        Path::new("runs").join(
            a.config
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "run".into()),
        )
    });
    if a.check {
        return check(&cfg, device).map(|()| 0);
    }
    let signals = Signals::install(true)?;
    let dist = tricks::distributed::DistEnv::from_env()?;
    // A data-parallel rank trains on its own GPU: cuda means cuda:LOCAL_RANK.
    let device = match (&dist, device) {
        (Some(env), tch::Device::Cuda(0)) if a.device == "cuda" || a.device == "auto" => {
            device::parse_device(&format!("cuda:{}", env.local_rank))?
        }
        _ => device,
    };
    let mut opts = engine::RunOptions::new(&out, device);
    opts.resume = a.resume;
    opts.progress = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    opts.stop = signals.stop.clone();
    if let Some(env) = &dist {
        opts.progress &= env.rank == 0;
        let group = tricks::distributed::ProcessGroup::init(env, &cfg.distributed, device)?;
        opts.dist = Some(Arc::new(group));
        if env.rank != 0 {
            let stopped = match cfg.task {
                tricks::config::Task::Classification => classify::train(&cfg, &opts)?.stopped_early,
                tricks::config::Task::Segmentation => {
                    tricks::segment::train(&cfg, &opts)?.stopped_early
                }
                tricks::config::Task::Detection => {
                    tricks::detect::train(&cfg, &opts)?.stopped_early
                }
            };
            return Ok(signals.exit_code(stopped));
        }
    }
    if cfg.task != tricks::config::Task::Classification {
        let stopped = train_dense(&cfg, &opts)?;
        return Ok(signals.exit_code(stopped));
    }
    eprintln!(
        "training {} (variant {}) on {} → {}",
        cfg.model.name,
        cfg.model.variant,
        cfg.data.dir,
        out.display()
    );
    let s = classify::train(&cfg, &opts)?;
    if s.stopped_early {
        eprintln!(
            "stopped early after {} epoch(s); outputs in {}",
            s.epochs,
            out.display()
        );
    } else {
        println!(
            "done: {} epochs, final top-1 {:.2}% top-5 {:.2}%, best top-1 {:.2}% (epoch {}), {:.0} img/s, {:.0}s training; outputs in {}",
            s.epochs,
            s.final_top1,
            s.final_top5,
            s.best_top1,
            s.best_epoch,
            s.images_per_second,
            s.train_seconds,
            out.display()
        );
    }
    Ok(signals.exit_code(s.stopped_early))
}

/// `train --check`: everything that can be validated without spending compute.
fn check(cfg: &Config, device: tch::Device) -> Result<()> {
    train::precision::check_supported(cfg.train.precision, device)?;
    if cfg.task == tricks::config::Task::Segmentation {
        tricks::segment::check(cfg)?
            .iter()
            .for_each(|l| println!("{l}"));
        return Ok(());
    }
    if cfg.task == tricks::config::Task::Detection {
        tricks::detect::check(cfg)?
            .iter()
            .for_each(|l| println!("{l}"));
        return Ok(());
    }
    tricks::model::Classifier::check_config(&cfg.model)?;
    println!(
        "config: ok ({} variant {}, peak lr {})",
        cfg.model.name,
        cfg.model.variant,
        train::schedule::peak_lr(&cfg.optim, cfg.train.batch_size, 1)
    );
    if !cfg.distill.teacher.is_empty() {
        let (_, _, tcfg, _) =
            tricks::model::load_model(Path::new(&cfg.distill.teacher), tch::Device::Cpu)
                .with_context(|| {
                    format!("key `distill.teacher`: cannot load {}", cfg.distill.teacher)
                })?;
        println!(
            "teacher: ok ({} variant {})",
            tcfg.model.name, tcfg.model.variant
        );
    }
    if cfg.data.dir.is_empty() {
        println!("data: not given (pass --data DIR or set data.dir)");
    } else {
        let (tr, va) = data::open_train_val(&cfg.data, cfg.seed)?;
        let skipped = tr.skipped_files().len() + va.skipped_files().len();
        println!(
            "data: ok ({} training and {} evaluation images, {} classes, {} steps per epoch{})",
            tr.len(),
            va.len(),
            tr.classes().len(),
            tr.len() / cfg.train.batch_size,
            if skipped > 0 {
                format!("; {skipped} entries skipped, named in the warnings above")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Trains a segmentation or detection run, saying what it trains and how it ended; returns
/// whether it stopped early.
fn train_dense(cfg: &Config, opts: &engine::RunOptions) -> Result<bool> {
    use tricks::config::Task;
    use tricks::experiments::{results::metric_names, RunOutcome};
    let out = opts.out_dir.display();
    let model = match cfg.task {
        Task::Detection => "Faster R-CNN + FPN",
        _ => "FCN",
    };
    eprintln!(
        "training {model} on {} (variant {}), {} on {} → {out}",
        cfg.model.name,
        cfg.model.variant,
        format!("{:?}", cfg.task).to_lowercase(),
        cfg.data.dir
    );
    let s = match cfg.task {
        Task::Detection => RunOutcome::from(&tricks::detect::train(cfg, opts)?),
        _ => RunOutcome::from(&tricks::segment::train(cfg, opts)?),
    };
    let n = metric_names(cfg.task);
    if s.stopped_early {
        eprintln!(
            "stopped early after {} epoch(s); outputs in {out}",
            s.epochs
        );
    } else {
        println!(
            "done: {} epochs, final {} {:.2}% {} {:.2}%, best {} {:.2}% (epoch {}), {:.1} img/s, {:.0}s training; outputs in {out}",
            s.epochs, n.headline, s.final_metric, n.second, s.final_second, n.headline, s.best_metric, s.best_epoch, s.images_per_second, s.train_seconds
        );
    }
    Ok(s.stopped_early)
}

/// `tricks predict` with a detection checkpoint: the boxes of every image given, printed (or one
/// JSON object per image), and drawn into `--out` (a file for one image, else a folder).
fn predict_detection(a: &PredictArgs, device: tch::Device) -> Result<i32> {
    if a.image.is_empty() && a.list.is_none() {
        anyhow::bail!("nothing to detect: give --image IMG_OR_FOLDER (repeatable) or --list FILE");
    }
    let inputs = classify::predict::gather_inputs(&a.image, a.list.as_deref())?;
    for (path, why) in &inputs.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let detector = tricks::detect::predict::Detector::load(&a.checkpoint, device)?;
    let single = inputs.paths.len() == 1 && a.image.len() == 1 && a.image[0].is_file();
    if let (Some(out), false) = (&a.out, single) {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    }
    let mut failed = 0usize;
    for path in &inputs.paths {
        let out = a.out.as_ref().map(|o| match single {
            true => o.clone(),
            false => o.join(format!(
                "{}.png",
                path.file_stem().unwrap_or_default().to_string_lossy()
            )),
        });
        match tricks::detect::predict::predict_image(&detector, path, out.as_deref()) {
            Ok((boxes, size)) if a.json => {
                println!(
                    "{}",
                    tricks::detect::predict::boxes_json(path, size, &boxes)
                );
            }
            Ok((boxes, (w, h))) => {
                println!("{} ({w}x{h}): {} objects", path.display(), boxes.len());
                for b in &boxes {
                    let [x1, y1, x2, y2] = b.bbox;
                    println!(
                        "  {:<16} {:>6.3}  [{x1:.1}, {y1:.1}, {x2:.1}, {y2:.1}]",
                        b.class, b.score
                    );
                }
            }
            Err(e) => {
                eprintln!("{e:#} (skipped)");
                failed += 1;
            }
        }
    }
    if let Some(out) = &a.out {
        eprintln!("boxes drawn into {}", out.display());
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} images could not be read",
            inputs.paths.len()
        );
        return Ok(1);
    }
    Ok(0)
}

/// `tricks predict`: a segmentation checkpoint's mask of one image, or a classification
/// checkpoint's top classes of every image given (exit status 1 when some could not be read).
fn cmd_export(a: ExportArgs) -> Result<()> {
    let opts = tricks::export::ExportOptions {
        size: a.size,
        batch: a.batch,
        precision: a.precision.parse().context("--precision")?,
        device: device::parse_device(&a.device)?,
    };
    let info = tricks::export::export(&a.checkpoint, &a.out, &opts)?;
    println!(
        "wrote {} (TorchScript, {} {} {}: input {:?} float32 RGB in [0, 1], normalised inside; output {} {:?}) and {}",
        a.out.display(),
        info.task,
        info.model,
        info.precision,
        info.input.shape,
        if info.task == "segmentation" { "per-pixel logits" } else { "logits" },
        info.output.shape,
        tricks::export::info_path(&a.out).display()
    );
    println!(
        "checked: loaded back through libtorch, max |difference| from tricks' forward pass {:.3e}",
        info.check_max_abs_diff
    );
    Ok(())
}

fn cmd_predict(a: PredictArgs) -> Result<i32> {
    let device = device::parse_device(&a.device)?;
    match tricks::checkpoint::task_of(&a.checkpoint) {
        tricks::config::Task::Segmentation => return predict_segmentation(&a, device).map(|()| 0),
        tricks::config::Task::Detection => return predict_detection(&a, device),
        tricks::config::Task::Classification => {}
    }
    if a.out.is_some() {
        anyhow::bail!(
            "{}: a classification checkpoint: --out writes segmentation masks; the top classes \
             of its images are printed (--json, --csv FILE)",
            a.checkpoint.display()
        );
    }
    if a.image.is_empty() && a.list.is_none() {
        anyhow::bail!(
            "nothing to classify: give --image IMG_OR_FOLDER (repeatable) or --list FILE"
        );
    }
    let opts = classify::predict::PredictOptions {
        device,
        topk: a.topk,
        flip: a.flip,
        translate: a.translate,
        threads: a.threads,
    };
    let predictor = classify::predict::Predictor::load(&a.checkpoint, &opts)?;
    let inputs = classify::predict::gather_inputs(&a.image, a.list.as_deref())?;
    for (path, why) in &inputs.skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    let k = predictor.topk();
    let mut csv = match &a.csv {
        Some(p) => {
            let f = std::fs::File::create(p)
                .with_context(|| format!("cannot write {}", p.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let header: Vec<String> = std::iter::once("path".to_string())
                .chain((1..=k).flat_map(|i| [format!("class_{i}"), format!("probability_{i}")]))
                .collect();
            writeln!(w, "{}", header.join(","))?;
            Some(w)
        }
        None => None,
    };
    let total = inputs.paths.len();
    let bar = if a.no_progress || total <= a.batch_size {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("predict [{bar:30}] {pos}/{len} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    };
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0usize;
    for chunk in inputs.paths.chunks(a.batch_size) {
        let (predictions, unreadable) = predictor.predict_files(chunk)?;
        let printed = bar.suspend(|| -> Result<()> {
            for u in &unreadable {
                eprintln!("{} (skipped)", u.error);
            }
            for p in &predictions {
                print_prediction(&mut stdout, p, a.json)?;
                if let Some(w) = csv.as_mut() {
                    let mut row = vec![csv_field(&p.path.to_string_lossy())];
                    for c in &p.topk {
                        row.push(csv_field(&c.class));
                        row.push(format!("{:.6}", c.probability));
                    }
                    writeln!(w, "{}", row.join(","))?;
                }
            }
            stdout.flush()?;
            Ok(())
        });
        failed += unreadable.len();
        if let Err(e) = printed {
            // The reader went away (`| head`): stop quietly, as other command-line tools do.
            let closed = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
            if closed {
                bar.finish_and_clear();
                return Ok(i32::from(failed > 0));
            }
            return Err(e);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if let (Some(mut w), Some(p)) = (csv, &a.csv) {
        w.flush()
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if failed > 0 {
        eprintln!("{failed} of {total} images could not be read");
        return Ok(1);
    }
    Ok(0)
}

/// One image's top classes: a small table (the path, then rank, class and probability), or one
/// JSON line.
fn print_prediction(
    out: &mut impl Write,
    p: &classify::predict::Prediction,
    json: bool,
) -> Result<()> {
    if json {
        let line = serde_json::json!({"path": p.path.to_string_lossy(), "topk": p.topk});
        writeln!(out, "{line}")?;
        return Ok(());
    }
    writeln!(out, "{}", p.path.display())?;
    let width = p.topk.iter().map(|c| c.class.len()).max().unwrap_or(0);
    for (i, c) in p.topk.iter().enumerate() {
        writeln!(
            out,
            "  {:>2}  {:<width$}  {:>7.3}%",
            i + 1,
            c.class,
            100.0 * c.probability
        )?;
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `tricks predict` with a segmentation checkpoint: one `--image`, its mask to `--out`.
fn predict_segmentation(a: &PredictArgs, device: tch::Device) -> Result<()> {
    let (image, out) = match (a.image.as_slice(), &a.out, &a.list) {
        ([image], Some(out), None) => (image, out),
        _ => anyhow::bail!(
            "{}: a segmentation checkpoint predicts one image: give --image IMG --out MASK.png",
            a.checkpoint.display()
        ),
    };
    let (p, names) = tricks::segment::predict_image(&a.checkpoint, image, out, device)?;
    let total = (p.width as usize * p.height as usize).max(1);
    let mut shares: Vec<(usize, &String)> = p
        .counts
        .iter()
        .copied()
        .zip(names.iter())
        .filter(|(n, _)| *n > 0)
        .collect();
    shares.sort_by_key(|s| std::cmp::Reverse(s.0));
    let top: Vec<String> = shares
        .iter()
        .take(5)
        .map(|(n, c)| format!("{c} {:.1}%", 100.0 * *n as f64 / total as f64))
        .collect();
    println!(
        "{}: {}x{} segmented → {} ({})",
        image.display(),
        p.width,
        p.height,
        out.display(),
        top.join(", ")
    );
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let device = device::parse_device(&a.device)?;
    let precision: tricks::config::Precision = a.precision.parse()?;
    if tricks::checkpoint::task_of(&a.checkpoint) == tricks::config::Task::Detection {
        if precision != tricks::config::Precision::Fp32 || a.channels_last {
            anyhow::bail!(
                "{}: --precision and --channels-last apply to classification checkpoints; a \
                 detection checkpoint is evaluated in fp32",
                a.checkpoint.display()
            );
        }
        let (e, _) = tricks::detect::predict::evaluate_checkpoint(
            &a.checkpoint,
            a.data.as_deref(),
            a.split.as_deref(),
            device,
        )?;
        println!(
            "{}: mAP {:.2}%  AP50 {:.2}%  AP75 {:.2}%  ({} images, {} detections)\n{}AP per class (%): {}",
            a.checkpoint.display(),
            e.map(),
            e.ap50(),
            e.ap75(),
            e.images,
            e.detections,
            e.report(),
            e.class_ap()
                .iter()
                .map(|(c, v)| format!("{c} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    if let Some(split) = &a.split {
        anyhow::bail!(
            "{}: --split {split} applies to detection checkpoints (classification and segmentation \
             evaluate the dataset's val/ or test/ folder)",
            a.checkpoint.display()
        );
    }
    if tricks::checkpoint::task_of(&a.checkpoint) == tricks::config::Task::Segmentation {
        if precision != tricks::config::Precision::Fp32 || a.channels_last {
            anyhow::bail!(
                "{}: --precision and --channels-last apply to classification checkpoints; a \
                 segmentation checkpoint is evaluated in fp32",
                a.checkpoint.display()
            );
        }
        let (e, cfg) = tricks::segment::evaluate_checkpoint(
            &a.checkpoint,
            a.data.as_deref(),
            device,
            a.batch_size,
        )?;
        let names = tricks::segment::class_names(&cfg);
        let per_class: Vec<String> = e
            .iou
            .iter()
            .zip(&names)
            .map(|(v, n)| format!("{n} {}", v.map_or("-".into(), |v| format!("{v:.1}"))))
            .collect();
        println!(
            "{}: pixel accuracy {:.2}%  mIoU {:.2}%  loss {:.4}  ({} images)\nIoU per class (%): {}",
            a.checkpoint.display(),
            e.pixel_acc,
            e.miou,
            e.loss,
            e.images,
            per_class.join(", ")
        );
        return Ok(());
    }
    tricks::train::precision::check_supported(precision, device)?;
    let (model, vs, mut cfg, classes) = tricks::model::load_model(&a.checkpoint, device)?;
    if a.channels_last {
        device::weights_to_channels_last(&vs);
    }
    if let Some(d) = a.data {
        cfg.data.dir = d;
    }
    cfg.data.val_limit = 0;
    let ds = data::open_split(&cfg.data, data::Split::Val, cfg.seed)?;
    if !classes.is_empty() && ds.classes() != classes.as_slice() {
        anyhow::bail!(
            "{}: the dataset's classes differ from the checkpoint's ({}",
            cfg.data.dir,
            data::class_difference(ds.classes(), &classes, "the dataset", "the checkpoint")
        );
    }
    device::configure(cfg.train.threads, device, cfg.train.cudnn_benchmark);
    let loader = data::Loader::eval(ds, &cfg.data.for_device(device), a.batch_size);
    let settings = classify::EvalSettings {
        device,
        precision,
        channels_last: a.channels_last,
        flip: a.flip.unwrap_or(cfg.train.eval_flip),
        translate: a.translate.unwrap_or(cfg.train.eval_translate),
    };
    let r = classify::evaluate(&model, loader, settings)?;
    println!(
        "{}: top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({} images{})",
        a.checkpoint.display(),
        r.top1,
        r.top5,
        r.loss,
        r.samples,
        match (settings.flip, settings.translate) {
            (false, false) => "",
            (true, false) => ", each with its mirror image",
            (false, true) => ", each with two shifted copies",
            (true, true) => ", each with its mirror image and two shifted copies",
        }
    );
    Ok(())
}

fn cmd_ablate(a: AblateArgs) -> Result<i32> {
    let device = match a.device {
        Some(d) => device::parse_device(&d)?,
        None => match tricks::experiments::study_device(&a.study)? {
            Some(d) => device::parse_device(&d)?,
            None => tch::Device::Cpu,
        },
    };
    let mut opts = tricks::experiments::AblateOptions::new(a.jobs.max(1), device);
    opts.progress = a.jobs <= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    opts.overrides = a.overrides.clone();
    opts.seeds = a.seeds.clone();
    let signals = Signals::install(true)?;
    opts.stop = signals.stop.clone();
    let report = tricks::experiments::ablate_with(&a.study, &a.out, &opts)?;
    println!("{}", report.summary_line());
    if !report.failed.is_empty() {
        for (variant, seed, err) in &report.failed {
            eprintln!(
                "failed: {variant} seed {seed}: {}",
                tricks::config::shorten_message(err)
            );
        }
        anyhow::bail!(
            "{} run(s) failed (see error.txt in their folders)",
            report.failed.len()
        );
    }
    Ok(signals.exit_code(report.interrupted))
}

fn cmd_info() -> Result<()> {
    for (k, v) in device::describe() {
        println!("{k:>18}: {v}");
    }
    Ok(())
}

/// Exits like its ranks: 0 when they finished, 130/143 when a signal stopped them after their
/// checkpoint (the launcher's own signal, forwarded to them as SIGTERM, decides which), 1 when
/// one failed.
fn cmd_launch(a: LaunchArgs) -> Result<i32> {
    // No exit on a second signal here: the ranks get theirs and the launcher waits for them.
    let signals = Signals::install(false)?;
    let ranks_stopped = tricks::distributed::launch::run(
        &tricks::distributed::launch::LaunchSpec {
            nproc: a.nproc,
            nnodes: a.nnodes,
            node_rank: a.node_rank,
            master_addr: a.master_addr,
            master_port: a.master_port,
            args: a.args,
            grace: std::time::Duration::from_secs_f64(a.grace.max(0.0)),
        },
        signals.stop.clone(),
    )?;
    Ok(match ranks_stopped {
        None => 0,
        Some(code) => match signals.exit_code(true) {
            0 => code, // a rank was signalled directly
            own => own,
        },
    })
}
