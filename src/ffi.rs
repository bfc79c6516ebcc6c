//! The C++ shim in `csrc/shim.cpp`: libtorch calls that tch does not expose.

extern "C" {
    /// device: 0 = CPU, 1 = CUDA; dtype: 0 = bf16, 1 = f16.
    pub fn tricks_autocast_set(device: i32, enabled: bool, dtype: i32);
    pub fn tricks_autocast_is_enabled(device: i32) -> bool;
    pub fn tricks_autocast_clear_cache();
    pub fn tricks_autocast_increment_nesting() -> i32;
    pub fn tricks_autocast_decrement_nesting() -> i32;
    pub fn tricks_set_cudnn_benchmark(enabled: bool);
    pub fn tricks_cudnn_benchmark() -> bool;
    pub fn tricks_torch_version(major: *mut i32, minor: *mut i32, patch: *mut i32);
    /// An uninitialised page-locked f32 CPU tensor (`at::Tensor*`), or NULL.
    pub fn tricks_empty_pinned_f32(sizes: *const i64, ndim: i32) -> *mut std::ffi::c_void;
    /// Batch norm of a channels_last CPU tensor (batch statistics when `train`, else running
    /// ones), then `epilogue` (0 none, 1 ReLU, 2 add `residual` then ReLU; `residual` NULL unless
    /// 2) (csrc/bn_relu.cpp). NULL with `*out` set, NULL with `*out` NULL when an inference-mode
    /// call would need an autograd graph, or an error for `tricks_dist_free_error`.
    #[allow(clippy::too_many_arguments)]
    pub fn tricks_bn_fused(
        x: *mut std::ffi::c_void,
        weight: *mut std::ffi::c_void,
        bias: *mut std::ffi::c_void,
        running_mean: *mut std::ffi::c_void,
        running_var: *mut std::ffi::c_void,
        train: bool,
        momentum: f64,
        eps: f64,
        epilogue: i32,
        residual: *mut std::ffi::c_void,
        out: *mut *mut std::ffi::c_void,
    ) -> *mut std::ffi::c_char;
    /// `t.grad = g` (both `at::Tensor*`, i.e. tch's `*mut C_tensor`).
    pub fn tricks_set_grad(t: *mut std::ffi::c_void, g: *mut std::ffi::c_void);
    /// Lookahead's averaging step over `n` variable pairs (`at::Tensor*`): `slow[i]` moves
    /// `weight` of the way to `live[i]` (skipped with `copy_only`), then `live[i] = slow[i]`, in
    /// two multi-tensor operations. NULL, or an error for `take_error`.
    pub fn tricks_lookahead_step(
        slow: *const *mut std::ffi::c_void,
        live: *const *mut std::ffi::c_void,
        n: i64,
        weight: f64,
        copy_only: bool,
    ) -> *mut std::ffi::c_char;
    /// Starts counting outermost ATen operator calls on every thread (resetting the count).
    pub fn tricks_op_count_start();
    /// Stops counting; the calls since `tricks_op_count_start`.
    pub fn tricks_op_count_stop() -> i64;
}

// csrc/dist.cpp: c10d. Functions returning `*mut c_char` return NULL on success or a malloc'ed
// error message to be released with `tricks_dist_free_error`. Tensors are passed as tch's
// `*mut C_tensor` (an `at::Tensor*`).
use std::ffi::{c_char, c_void};
extern "C" {
    pub fn tricks_dist_free_error(err: *mut c_char);
    /// backend: 0 = Gloo, 1 = NCCL.
    pub fn tricks_dist_init(
        backend: i32,
        host: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn tricks_dist_free(group: *mut c_void);
    pub fn tricks_dist_all_reduce_sum(group: *mut c_void, t: *mut c_void) -> *mut c_char;
    pub fn tricks_dist_all_reduce_max(group: *mut c_void, t: *mut c_void) -> *mut c_char;
    pub fn tricks_dist_broadcast(group: *mut c_void, t: *mut c_void, root: i32) -> *mut c_char;
    pub fn tricks_dist_barrier(group: *mut c_void) -> *mut c_char;
    pub fn tricks_dist_all_reduce_sum_autograd(
        group: *mut c_void,
        t: *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn tricks_reducer_new(
        group: *mut c_void,
        params: *const *mut c_void,
        names: *const *const c_char,
        n: i32,
        bucket_bytes: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn tricks_reducer_prepare(reducer: *mut c_void) -> *mut c_char;
    pub fn tricks_reducer_free(reducer: *mut c_void) -> *mut c_char;
    pub fn tricks_dist_has_nccl() -> i32;
}

/// The message of an error returned across the C ABI (csrc/ffi_error.h), freeing it; `None` for
/// NULL (success).
pub(crate) fn take_error(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    // SAFETY: a non-null error is a NUL-terminated malloc'ed string from csrc/ffi_error.h.
    let msg = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { tricks_dist_free_error(err) };
    Some(msg)
}
