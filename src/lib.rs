//! `tricks`: ResNet image classifiers trained with the Bag of Tricks (He et al. 2019) on libtorch.
//!
//! config (TOML) → data (datasets, transforms, loader) → model (ResNet family) →
//! train (loop, optimizer, schedule, losses, tricks) → checkpoint/metrics → recipe (a config
//! checked against the model family and the task) → experiments (ablate, report, plots). The
//! CLI in `main.rs` is a thin layer over this library.

pub mod bench;
pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod data;
pub mod detect;
pub mod device;
pub mod distributed;
pub mod draw;
pub mod engine;
pub mod experiments;
pub mod export;
pub mod ffi;
pub mod metrics;
pub mod model;
pub mod recipe;
pub mod seed;
pub mod segment;
pub mod tensorboard;
pub mod train;
