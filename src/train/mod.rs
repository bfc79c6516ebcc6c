//! Training tricks and the parts of a step: the optimizer, the schedule and every trick (the
//! loop that uses them is the [`crate::engine`]).
//!
//! Each trick lives in the module named after it: `schedule` (linear scaling, warmup, step and
//! cosine decay, airbench's triangle), `loss` (label smoothing, distillation), `mixup`, `clip`,
//! `precision` (autocast and loss scaling), `optim` (Nesterov SGD, no bias decay, BN-bias lr
//! scaling), `lookahead`; zero-γ lives with the model, alternating flip and reflect padding
//! with the data pipeline.

pub mod clip;
pub(crate) mod data_parallel;
pub mod ema;
pub mod lookahead;
pub mod loss;
pub mod mixup;
pub mod optim;
pub mod precision;
pub mod schedule;

pub use data_parallel::DataParallel;

/// libtorch's random generator is process-wide: trainings started together in one process
/// (`ablate --jobs N`) take this lock around seeding and weight initialisation.
pub(crate) static MODEL_INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A 64-bit seed for a named random stream at a given position, so that every random choice is a
/// pure function of (seed, stream, epoch, step) and resuming a run replays it exactly.
pub fn derive_seed(seed: u64, stream: &str, a: u64, b: u64) -> u64 {
    // SplitMix64 over the inputs: cheap, well mixed, stable across platforms.
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut mix = |v: u64| {
        x = x.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    };
    for byte in stream.bytes() {
        mix(byte as u64);
    }
    mix(a);
    mix(b);
    x
}
