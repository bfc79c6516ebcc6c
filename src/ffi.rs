//! The C++ shim in `csrc/shim.cpp`: libtorch calls that tch does not expose.

extern "C" {
    /// device: 0 = CPU, 1 = CUDA; dtype: 0 = bf16, 1 = f16.
    pub fn tricks_autocast_set(device: i32, enabled: bool, dtype: i32);
    pub fn tricks_autocast_is_enabled(device: i32) -> bool;
    pub fn tricks_autocast_clear_cache();
    pub fn tricks_autocast_increment_nesting() -> i32;
    pub fn tricks_autocast_decrement_nesting() -> i32;
    pub fn tricks_set_cudnn_benchmark(enabled: bool);
    pub fn tricks_torch_version(major: *mut i32, minor: *mut i32, patch: *mut i32);
}
