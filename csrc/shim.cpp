// Small C ABI over the parts of libtorch that tch does not expose.
// Autocast: tch only toggles CUDA autocast (and only in f16); CPU bf16 autocast
// (AMX / AVX-512-BF16) and CUDA bf16 need the device-typed calls below.
#include <ATen/autocast_mode.h>
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/core/ScalarType.h>
#include <torch/headeronly/version.h>

#include <atomic>
#include <vector>

#include "ffi_error.h"

extern "C" {

// device: 0 = CPU, 1 = CUDA. dtype: 0 = bfloat16, 1 = float16.
void tricks_autocast_set(int device, bool enabled, int dtype) {
  at::DeviceType dev = device == 1 ? at::kCUDA : at::kCPU;
  at::ScalarType st = dtype == 1 ? at::kHalf : at::kBFloat16;
  at::autocast::set_autocast_dtype(dev, st);
  at::autocast::set_autocast_enabled(dev, enabled);
}

bool tricks_autocast_is_enabled(int device) {
  return at::autocast::is_autocast_enabled(device == 1 ? at::kCUDA : at::kCPU);
}

void tricks_autocast_clear_cache() { at::autocast::clear_cache(); }

int tricks_autocast_increment_nesting() { return at::autocast::increment_nesting(); }

int tricks_autocast_decrement_nesting() { return at::autocast::decrement_nesting(); }

// cuDNN autotuner: picks the fastest convolution algorithm for fixed shapes.
void tricks_set_cudnn_benchmark(bool enabled) { at::globalContext().setBenchmarkCuDNN(enabled); }

bool tricks_cudnn_benchmark() { return at::globalContext().benchmarkCuDNN(); }


// Makes `g` the gradient tensor of `t` (autograd then accumulates into it in place): lets the
// optimizer keep every gradient as a view of one flat buffer.
void tricks_set_grad(at::Tensor* t, at::Tensor* g) { t->mutable_grad() = *g; }

// Lookahead's averaging step in two multi-tensor operations instead of two per variable (each a
// kernel launch on a GPU; timm's ModelEmaV3 averages with the same _foreach_lerp_):
// slow[i] += weight * (live[i] - slow[i]), then live[i] = slow[i]. With copy_only, only the copy.
// Tensors are at::Tensor* (tch's C_tensor*). NULL, or an error message (ffi_error.h).
char* tricks_lookahead_step(at::Tensor** slow, at::Tensor** live, int64_t n, double weight,
                            bool copy_only) {
  return tricks::guarded([&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> s, l;
    s.reserve(n);
    l.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      s.push_back(*slow[i]);
      l.push_back(*live[i]);
    }
    if (!copy_only) at::_foreach_lerp_(s, l, at::Scalar(weight));
    at::_foreach_copy_(l, s);
  });
}

// An uninitialised f32 CPU tensor in page-locked memory from libtorch's caching host allocator
// (PyTorch DataLoader's pin_memory): a copy from it to a GPU can be asynchronous, and the
// allocator keeps the block until the copy using it has finished. NULL when it cannot be had
// (no CUDA driver, or the allocation failed).
at::Tensor* tricks_empty_pinned_f32(const int64_t* sizes, int ndim) {
  try {
    return new at::Tensor(at::empty(at::IntArrayRef(sizes, ndim),
                                     at::TensorOptions().dtype(at::kFloat).pinned_memory(true)));
  } catch (...) {
    return nullptr;
  }
}

// The libtorch version whose headers this binary was built against.
void tricks_torch_version(int* major, int* minor, int* patch) {
  *major = TORCH_VERSION_MAJOR;
  *minor = TORCH_VERSION_MINOR;
  *patch = TORCH_VERSION_PATCH;
}

// Operator calls: counts the outermost recorded calls on every thread between start and stop:
// each ATen operator called from Rust, and each node the backward pass evaluates (its operators
// nest inside it). On a GPU each is at least one kernel launch, the cost that bounds small models
// there; nested calls (conv2d -> convolution -> the backend kernel) count once.
namespace {
std::atomic<int64_t> op_calls{0};
thread_local int op_depth = 0;
at::CallbackHandle op_counter = 0;
}  // namespace

void tricks_op_count_start() {
  if (op_counter != 0) at::removeCallback(op_counter);
  op_calls = 0;
  op_counter = at::addGlobalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
            if (op_depth++ == 0) op_calls.fetch_add(1, std::memory_order_relaxed);
            return nullptr;
          },
          [](const at::RecordFunction&, at::ObserverContext*) { --op_depth; })
          .scopes({at::RecordScope::FUNCTION}));
}

int64_t tricks_op_count_stop() {
  if (op_counter != 0) {
    at::removeCallback(op_counter);
    op_counter = 0;
  }
  return op_calls.load();
}

}  // extern "C"
