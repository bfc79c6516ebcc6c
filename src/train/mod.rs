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
pub mod shadow;

pub use crate::seed::derive_seed;
pub use data_parallel::DataParallel;

/// libtorch's random generator is process-wide: trainings started together in one process
/// (`ablate --jobs N`) take this lock around seeding and weight initialisation.
pub(crate) static MODEL_INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
