//! Benchmark, not a test (ignored): the fused CPU batch norm kernels (csrc/bn_relu.cpp: batch
//! norm + ReLU, batch norm + residual add + ReLU at block ends, batch norm + GELU in airbench94's
//! network) against libtorch's kernels, in one process, alternating blocks of training steps
//! (forward + backward, bf16 autocast, channels_last) between the two, because this VM drifts
//! between processes by more than the effect. Also times inference after each block (the one-pass
//! inference kernel against libtorch's).
//!
//!   cargo test --release --test fused_bn_speed -- --ignored --nocapture
//!
//! STEPS=1 WARM=0 with many ROUNDS alternates step by step, the steadiest setting on a VM whose
//! speed wanders within seconds; `speedup_median` is the median round's ratio.
//!
//! Environment: MODEL (cifar_resnet20; any `model.name`, airbench94 at SIZE 32), VARIANT (a),
//! BATCH (128), SIZE (32), ROUNDS (8 blocks each), STEPS (6 timed steps per block, after WARM
//! untimed ones, 2), THREADS (2).

mod common;

use common::env_or;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tricks::config::{ModelConfig, Precision};
use tricks::device::{configure, to_channels_last, weights_to_channels_last};
use tricks::model::norm::set_fused_batch_norm;
use tricks::model::Classifier;
use tricks::train::precision::Autocast;

#[test]
#[ignore]
fn fused_batch_norm_against_libtorch() {
    let model: String = env_or("MODEL", "cifar_resnet20".to_string());
    let variant: String = env_or("VARIANT", "a".to_string());
    let (batch, size): (i64, i64) = (env_or("BATCH", 128), env_or("SIZE", 32));
    let (rounds, steps): (usize, usize) = (env_or("ROUNDS", 8), env_or("STEPS", 6));
    let warm: usize = env_or("WARM", 2);
    configure(env_or("THREADS", 2), Device::Cpu, true);
    let cfg = ModelConfig {
        name: model.clone(),
        variant: variant.clone(),
        ..Default::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = Classifier::new(&vs.root(), &cfg, 10).unwrap();
    weights_to_channels_last(&vs);
    tch::manual_seed(0);
    let x = to_channels_last(&Tensor::randn(
        [batch, 3, size, size],
        (Kind::Float, Device::Cpu),
    ));
    let y = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
    // [libtorch, fused]: summed step seconds, steps, summed inference seconds, per-round ms.
    let mut train = [0.0f64; 2];
    let mut counted = [0usize; 2];
    let mut infer = [0.0f64; 2];
    let mut per_round: [Vec<f64>; 2] = [vec![], vec![]];
    for round in 0..2 * rounds {
        let fused = round % 2 == 1;
        set_fused_batch_norm(fused);
        let mut block = 0.0;
        for i in 0..steps + warm {
            let t = Instant::now();
            let loss = {
                let _ac = Autocast::enter(Precision::Bf16, Device::Cpu);
                net.forward_t(&x, true)
                    .to_kind(Kind::Float)
                    .cross_entropy_for_logits(&y)
            };
            for v in vs.trainable_variables() {
                let _ = v.grad().f_zero_();
            }
            loss.backward();
            if i >= warm {
                block += t.elapsed().as_secs_f64();
            }
        }
        train[fused as usize] += block;
        counted[fused as usize] += steps;
        per_round[fused as usize].push(block / steps as f64 * 1e3);
        let t = Instant::now();
        for _ in 0..steps {
            let _ = tch::no_grad(|| {
                let _ac = Autocast::enter(Precision::Bf16, Device::Cpu);
                net.forward_t(&x, false)
            });
        }
        infer[fused as usize] += t.elapsed().as_secs_f64();
    }
    let ms = |i: usize| train[i] / counted[i] as f64 * 1e3;
    let ims = |i: usize| infer[i] / counted[i] as f64 * 1e3;
    let ratios: Vec<f64> = per_round[0]
        .iter()
        .zip(&per_round[1])
        .map(|(a, b)| a / b)
        .collect();
    // The median round: one slow period of the VM moves the summed figure, not this.
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let ratios: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "{{\"model\":\"{model}\",\"variant\":\"{variant}\",\"batch\":{batch},\"size\":{size},\"rounds\":{rounds},\"steps\":{steps},\
\"libtorch_step_ms\":{:.1},\"fused_step_ms\":{:.1},\"speedup\":{:.3},\"speedup_median\":{median:.3},\"speedup_per_round\":[{}],\
\"libtorch_infer_ms\":{:.1},\"fused_infer_ms\":{:.1}}}",
        ms(0),
        ms(1),
        ms(0) / ms(1),
        ratios.join(","),
        ims(0),
        ims(1)
    );
}
