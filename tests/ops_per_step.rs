//! Operator calls per training step: the trainer's step (`tricks train`) against the bare step
//! of `tricks bench` (forward, cross-entropy, backward, flat SGD step) on the same model and
//! batch. On a GPU every outermost ATen call is at least one kernel launch, and launches bound
//! small models there: what the trainer adds per step is its cost on top of the model's.
//! libtorch's batch norm is used (`set_fused_batch_norm(false)`), as on a GPU.

mod common;

use tricks::bench::{count_ops, BenchSpec};
use tricks::classify::train;
use tricks::config::Config;
use tricks::engine::RunOptions;
use tricks::model::norm::set_fused_batch_norm;

/// One test function: `count_ops` counts every thread's operator calls, so nothing may run beside
/// it (the test harness would run a second test of this file in parallel).
/// Operator calls per step of `tricks bench` (forward, cross-entropy, backward, flat SGD step)
/// on `model` with a batch of 8 at `size` px, fp32.
fn bare_step_ops(model: &str, size: i64) -> i64 {
    let bench = tricks::bench::run(&BenchSpec {
        model: model.into(),
        variant: "a".into(),
        batch: 8,
        size,
        precision: "fp32".into(),
        channels_last: false,
        device: "cpu".into(),
        steps: 1,
        warmup: 1,
        threads: 1,
        per_tensor_optimizer: false,
        cifar_stem: false,
        lockstep: false,
    })
    .unwrap();
    let bench: serde_json::Value = serde_json::from_str(&bench).unwrap();
    bench["ops_per_train_step"].as_i64().unwrap()
}

/// Operator calls per step of `tricks train` on the tiny config (batch 8) with `overrides`.
/// Trainings of 2 and 4 steps differ only by 2 steps: start-up, checkpoints and the final
/// validation cancel out. data.on_device: batches come from tensor ops on the device (counted,
/// as they are launches on a GPU), not from loader threads.
fn trainer_step_ops(dir: &std::path::Path, data: &std::path::Path, overrides: &[&str]) -> i64 {
    std::fs::create_dir_all(dir).unwrap();
    let cfg_path = common::tiny_config(dir, data, 1, "");
    let ops = |steps: usize| {
        let mut sets = vec![
            format!("train.max_steps={steps}"),
            "data.on_device=true".into(),
        ];
        sets.extend(overrides.iter().map(|s| s.to_string()));
        let cfg = Config::load(&cfg_path, &sets).unwrap();
        let mut opts = RunOptions::new(dir.join(format!("run-{steps}")), tch::Device::Cpu);
        opts.log = std::sync::Arc::new(|_: &str| {});
        let (r, n) = count_ops(|| train(&cfg, &opts));
        r.unwrap();
        n
    };
    (ops(4) - ops(2)) / 2
}

/// One test function: `count_ops` counts every thread's operator calls, so nothing may run beside
/// it (the test harness would run a second test of this file in parallel).
#[test]
fn the_trainer_adds_few_operator_calls_to_the_bare_step() {
    count_ops_counts_outermost_operator_calls();
    set_fused_batch_norm(false);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::image_folder(&data, 10, 4, 1, 16);
    let bare = bare_step_ops("cifar_resnet8", 16);
    let per_step = trainer_step_ops(&dir.path().join("resnet8"), &data, &[]);
    println!("operator calls per step, ResNet-8: bare {bare}, trainer {per_step}");
    assert!(bare > 100, "{bare}");
    // Measured with libtorch 2.11 (ResNet-8: 109 bare): the trainer added 60 calls while its
    // loss went through a one-hot target tensor and its top-1 through topk, 46 after, 42 since
    // the crop offsets are made once. What is left: the batch's augmentation on the device (pad,
    // crop, flip, normalise), uploads and casts, the running sums and, on a CPU only, their read
    // at every step.
    let added = per_step - bare;
    assert!(
        (0..=44).contains(&added),
        "the trainer's step makes {added} operator calls more than the bare step ({per_step} against {bare}): each is a kernel launch on a GPU"
    );

    // configs/cifar10/airbench94.toml's tricks, on its network at 32 px: reflect padding,
    // alternating flip, label smoothing, BN-bias lr scale and lookahead (every 2 steps here, so
    // that the 2 steps counted hold one of its averaging steps; every 5 in the recipe).
    let data32 = dir.path().join("data32");
    common::image_folder(&data32, 10, 4, 1, 32);
    let bare = bare_step_ops("airbench94", 32);
    let recipe = [
        "model.name=airbench94",
        "model.whiten_bias_epochs=1",
        "data.train_size=32",
        "data.val_size=32",
        "data.pad_mode=\"reflect\"",
        "data.alternate_flip=true",
        "loss.label_smoothing=0.18",
        "optim.bn_bias_lr_scale=64.0",
        "optim.lookahead=true",
        "optim.lookahead_every=2",
    ];
    let per_step = trainer_step_ops(&dir.path().join("airbench"), &data32, &recipe);
    let no_lookahead = trainer_step_ops(&dir.path().join("airbench-la"), &data32, &recipe[..8]);
    println!(
        "operator calls per step, airbench94: bare {bare}, trainer {per_step}, without lookahead {no_lookahead}"
    );
    // Measured with libtorch 2.11 (163 bare, of which 88 are the flat step in 8 cache-sized
    // chunks, one chunk on a GPU): 79 more without lookahead. Per chunk, the per-element lr and
    // weight-decay scales of optim.bn_bias_lr_scale; once, the label-smoothed loss's backward
    // nodes, the augmentation (reflect-pad index, crop, alternating flip) and the running sums.
    let added = no_lookahead - bare;
    assert!(
        (0..=85).contains(&added),
        "airbench94's recipe without lookahead makes {added} operator calls per step more than the bare step ({no_lookahead} against {bare})"
    );
    // Lookahead's averaging step is two multi-tensor calls (a lerp and a copy over all 33
    // floating-point variables, parameters and BN statistics; 66 calls tensor by tensor), every
    // 2 steps in this test: 1 call per step.
    assert_eq!(
        per_step - no_lookahead,
        1,
        "{per_step} against {no_lookahead}"
    );
}

fn count_ops_counts_outermost_operator_calls() {
    use tch::{Kind, Tensor};
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
    let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, tch::Device::Cpu));
    let (_, one) = count_ops(|| x.relu());
    let (_, three) = count_ops(|| x.relu().relu().relu());
    // conv2d dispatches to convolution, _convolution and a backend kernel: one outer call.
    let (_, conv) = count_ops(|| x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1));
    let (_, none) = count_ops(|| 1 + 1);
    assert_eq!((one, three, conv, none), (1, 3, 1, 0));
    // Stopped: later calls are not counted.
    let (_, after) = count_ops(|| ());
    let _ = x.relu();
    assert_eq!(after, 0);
}
