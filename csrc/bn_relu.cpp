// Fused batch norm + ReLU for CPU training in channels_last layout (f32 or bf16 activations,
// f32 parameters and statistics, as under bf16 autocast).
//
// Why: on a CPU, libtorch's training-mode batch norm and ReLU are separate kernels that together
// pass over the activation 13 times per step (norm forward 3, ReLU forward 2, ReLU backward 3,
// norm backward 5); batch norm and ReLU were about a third of a CIFAR ResNet-20 bf16 step in
// PyTorch's profile. Here it is 8: the forward pass reads x twice and writes y once; the backward
// pass recomputes the ReLU mask from x (no saved output), reads x and dy twice and writes dx once.
// Each pass runs over the rows in parallel on libtorch's OpenMP threads (this file is built with
// -fopenmp: at::parallel_for is an inline OpenMP pragma) in loops the compiler vectorises, built
// for x86-64-v4 (AVX-512), v3 (AVX2) and baseline x86-64 and picked at load time. Speed against
// libtorch's kernels: BENCHMARKS.md.
//
// Numerics: per-channel sums are accumulated in f32 over blocks of rows and in f64 across blocks,
// shifted by the running mean (so that E[x²] − E[x]² does not cancel when the mean is large
// against the spread); the output is rounded once. The running statistics follow PyTorch's
// update (unbiased variance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ffi_error.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TRICKS_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TRICKS_CLONES
#endif
#define TRICKS_INLINE __attribute__((always_inline)) inline

using bf16 = c10::BFloat16;

TRICKS_INLINE float to_f(float v) { return v; }
TRICKS_INLINE float to_f(bf16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
TRICKS_INLINE T from_f(float f);
template <>
TRICKS_INLINE float from_f<float>(float f) {
  return f;
}
template <>
TRICKS_INLINE bf16 from_f<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  // Round to nearest even, as c10::BFloat16 does; a NaN stays a (quiet) NaN.
  uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : rounded;
  return bf16(bits, bf16::from_bits());
}

// The kernels walk tiles of R whole rows (R·C >= 256 values) with the per-channel parameters
// repeated R times, so that each inner loop runs over R·C contiguous values: restarting a C-long
// loop (and its vectoriser prologue and alias checks) at every row made a first version slower than
// libtorch for C = 16 (measured).
struct Tiling {
  int64_t C, R, L;  // channels, rows per tile, values per tile
  explicit Tiling(int64_t C) : C(C), R(std::max<int64_t>(1, (256 + C - 1) / C)), L(R * C) {}
  std::vector<float> repeat(const float* per_channel) const {
    std::vector<float> v(L);
    for (int64_t j = 0; j < L; ++j) v[j] = per_channel[j % C];
    return v;
  }
};

// Tiles per f32 accumulation block, after which the block's sums go into the f64 totals.
constexpr int64_t kTilesPerBlock = 64;

// a1 += x − shift and a2 += (x − shift)², value by value.
template <typename T>
TRICKS_INLINE void stats_span(const T* __restrict__ x, int64_t n, const float* __restrict__ shift,
                              float* __restrict__ a1, float* __restrict__ a2) {
  for (int64_t j = 0; j < n; ++j) {
    float d = to_f(x[j]) - shift[j];
    a1[j] += d;
    a2[j] += d * d;
  }
}

// y = x·scale + shift, then max(·, 0) when RELU.
template <typename T, bool RELU>
TRICKS_INLINE void norm_span(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                             const float* __restrict__ scale, const float* __restrict__ shift) {
  for (int64_t j = 0; j < n; ++j) {
    float v = to_f(x[j]) * scale[j] + shift[j];
    if (RELU) v = v > 0.f ? v : 0.f;
    y[j] = from_f<T>(v);
  }
}

// With g = dy where the forward output was positive (all of dy without RELU):
// a1 += g and a2 += g·(x − mean), value by value.
template <typename T, bool RELU>
TRICKS_INLINE void grad_stats_span(const T* __restrict__ x, const T* __restrict__ dy, int64_t n,
                                   const float* __restrict__ scale,
                                   const float* __restrict__ shift,
                                   const float* __restrict__ mean, float* __restrict__ a1,
                                   float* __restrict__ a2) {
  for (int64_t j = 0; j < n; ++j) {
    float xv = to_f(x[j]);
    float g = to_f(dy[j]);
    if (RELU) g = xv * scale[j] + shift[j] > 0.f ? g : 0.f;
    a1[j] += g;
    a2[j] += g * (xv - mean[j]);
  }
}

// dx = a·g + b·x + k (the batch-norm input gradient, expanded per channel).
template <typename T, bool RELU>
TRICKS_INLINE void grad_input_span(const T* __restrict__ x, const T* __restrict__ dy,
                                   T* __restrict__ dx, int64_t n, const float* __restrict__ scale,
                                   const float* __restrict__ shift, const float* __restrict__ a,
                                   const float* __restrict__ b, const float* __restrict__ k) {
  for (int64_t j = 0; j < n; ++j) {
    float xv = to_f(x[j]);
    float g = to_f(dy[j]);
    if (RELU) g = xv * scale[j] + shift[j] > 0.f ? g : 0.f;
    dx[j] = from_f<T>(a[j] * g + b[j] * xv + k[j]);
  }
}

// Calls span(offset, values) for the tiles of `rows` rows (the last one possibly short), and
// flush() after every kTilesPerBlock tiles and at the end.
template <typename Span, typename Flush>
TRICKS_INLINE void over_tiles(int64_t rows, const Tiling& t, const Span& span, const Flush& flush) {
  int64_t tiles = 0;
  for (int64_t r = 0; r < rows; r += t.R) {
    span(r * t.C, std::min(t.R, rows - r) * t.C);
    if (++tiles == kTilesPerBlock) {
      flush();
      tiles = 0;
    }
  }
  if (tiles > 0) flush();
}

// Adds the f32 block sums a1/a2 (L values) into the f64 per-channel totals s1/s2, and clears them.
TRICKS_INLINE void fold(const Tiling& t, float* a1, float* a2, double* s1, double* s2) {
  for (int64_t j = 0; j < t.L; ++j) {
    s1[j % t.C] += a1[j];
    s2[j % t.C] += a2[j];
    a1[j] = a2[j] = 0.f;
  }
}

// One multiversioned entry per kernel and dtype (GCC cannot clone templates), over `rows` rows.
#define TRICKS_DEFINE_KERNELS(T, SUFFIX)                                                          \
  TRICKS_CLONES void stats_##SUFFIX(const T* x, int64_t rows, const Tiling& t,                    \
                                    const float* shift, double* s1, double* s2, float* a1,        \
                                    float* a2) {                                                  \
    over_tiles(                                                                                   \
        rows, t, [&](int64_t o, int64_t n) { stats_span<T>(x + o, n, shift, a1, a2); },           \
        [&] { fold(t, a1, a2, s1, s2); });                                                        \
  }                                                                                               \
  TRICKS_CLONES void norm_##SUFFIX(const T* x, T* y, int64_t rows, const Tiling& t,               \
                                   const float* scale, const float* shift, bool relu) {           \
    over_tiles(                                                                                   \
        rows, t,                                                                                  \
        [&](int64_t o, int64_t n) {                                                               \
          if (relu)                                                                               \
            norm_span<T, true>(x + o, y + o, n, scale, shift);                                    \
          else                                                                                    \
            norm_span<T, false>(x + o, y + o, n, scale, shift);                                   \
        },                                                                                        \
        [] {});                                                                                   \
  }                                                                                               \
  TRICKS_CLONES void grad_stats_##SUFFIX(const T* x, const T* dy, int64_t rows, const Tiling& t,  \
                                         const float* scale, const float* shift,                 \
                                         const float* mean, bool relu, double* s1, double* s2,   \
                                         float* a1, float* a2) {                                  \
    over_tiles(                                                                                   \
        rows, t,                                                                                  \
        [&](int64_t o, int64_t n) {                                                               \
          if (relu)                                                                               \
            grad_stats_span<T, true>(x + o, dy + o, n, scale, shift, mean, a1, a2);              \
          else                                                                                    \
            grad_stats_span<T, false>(x + o, dy + o, n, scale, shift, mean, a1, a2);             \
        },                                                                                        \
        [&] { fold(t, a1, a2, s1, s2); });                                                        \
  }                                                                                               \
  TRICKS_CLONES void grad_input_##SUFFIX(const T* x, const T* dy, T* dx, int64_t rows,           \
                                         const Tiling& t, const float* scale, const float* shift, \
                                         bool relu, const float* a, const float* b,               \
                                         const float* k) {                                        \
    over_tiles(                                                                                   \
        rows, t,                                                                                  \
        [&](int64_t o, int64_t n) {                                                               \
          if (relu)                                                                               \
            grad_input_span<T, true>(x + o, dy + o, dx + o, n, scale, shift, a, b, k);           \
          else                                                                                    \
            grad_input_span<T, false>(x + o, dy + o, dx + o, n, scale, shift, a, b, k);          \
        },                                                                                        \
        [] {});                                                                                   \
  }

TRICKS_DEFINE_KERNELS(float, f32)
TRICKS_DEFINE_KERNELS(bf16, bf16)

// The rows are cut into chunks of whole tiles (enough work to be worth a thread, and at most
// kMaxChunks of them), run in parallel. Each chunk has its own partial sums, summed in chunk order
// afterwards: the result is the same whatever the number of threads (and a thread count changed
// elsewhere in the process between two calls cannot make threads share a slot).
constexpr int64_t kMaxChunks = 256;

struct Chunks {
  int64_t rows, count;
  Chunks(int64_t M, const Tiling& t) {
    const int64_t tiles = std::max<int64_t>(1, 32768 / t.L);  // per chunk, at least
    const int64_t total_tiles = (M + t.R - 1) / t.R;
    const int64_t per = std::max(tiles, (total_tiles + kMaxChunks - 1) / kMaxChunks);
    rows = per * t.R;
    count = (M + rows - 1) / rows;
  }
};

// Runs f(first_row, rows, chunk) for every chunk of the M rows, in parallel.
template <typename F>
void over_rows(int64_t M, const Chunks& ch, const F& f) {
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = k * ch.rows;
      f(r, std::min(ch.rows, M - r), int(k));
    }
  });
}

// Per-chunk f64 totals (two per channel) and f32 block sums (two per tile value).
struct Partials {
  int64_t C, L, T;
  std::vector<double> s1, s2;
  std::vector<float> a1, a2;
  Partials(const Tiling& t, const Chunks& ch)
      : C(t.C), L(t.L), T(ch.count), s1(C * T, 0.0), s2(C * T, 0.0), a1(L * T, 0.f),
        a2(L * T, 0.f) {}
  double* sum1(int t) { return s1.data() + t * C; }
  double* sum2(int t) { return s2.data() + t * C; }
  float* block1(int t) { return a1.data() + t * L; }
  float* block2(int t) { return a2.data() + t * L; }
  void total(std::vector<double>& t1, std::vector<double>& t2) const {
    t1.assign(C, 0.0);
    t2.assign(C, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += s1[t * C + c];
        t2[c] += s2[t * C + c];
      }
  }
};

void check_input(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fused batch norm: a 4-D CPU tensor is needed");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "fused batch norm: f32 or bf16 activations are needed");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fused batch norm: a channels_last tensor is needed");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "fused batch norm: f32 parameters of one value per channel are needed");
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Normalisation (+ ReLU) with given batch statistics; its backward is the training-mode batch
// norm gradient (the statistics depend on x), with the ReLU mask recomputed from x.
class BnReluFn : public torch::autograd::Function<BnReluFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, bool relu) {
    const int64_t C = x.size(1), M = x.numel() / C;
    const Tiling t(C);
    const Chunks ch(M, t);
    at::Tensor scale = weight.detach() * invstd;
    at::Tensor shift = bias.detach() - mean * scale;
    const auto sc = t.repeat(scale.const_data_ptr<float>());
    const auto sh = t.repeat(shift.const_data_ptr<float>());
    at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    over_rows(M, ch, [&](int64_t r, int64_t n, int) {
      if (x.scalar_type() == at::kFloat) {
        norm_f32(x.const_data_ptr<float>() + r * C, y.data_ptr<float>() + r * C, n, t, sc.data(),
                 sh.data(), relu);
      } else {
        norm_bf16(x.const_data_ptr<bf16>() + r * C, y.data_ptr<bf16>() + r * C, n, t, sc.data(),
                  sh.data(), relu);
      }
    });
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3],
                     &invstd = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor dy =
        grads[0].to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t C = x.size(1), M = x.numel() / C;
    const Tiling t(C);
    const Chunks ch(M, t);
    at::Tensor scale = weight.detach() * invstd;
    at::Tensor shift = bias.detach() - mean * scale;
    const float* mu = mean.const_data_ptr<float>();
    const float* is = invstd.const_data_ptr<float>();
    const float* sc1 = scale.const_data_ptr<float>();
    const auto sc = t.repeat(sc1);
    const auto sh = t.repeat(shift.const_data_ptr<float>());
    const auto mr = t.repeat(mu);
    Partials p(t, ch);
    over_rows(M, ch, [&](int64_t r, int64_t n, int k) {
      if (x.scalar_type() == at::kFloat) {
        grad_stats_f32(x.const_data_ptr<float>() + r * C, dy.const_data_ptr<float>() + r * C, n,
                       t, sc.data(), sh.data(), mr.data(), relu, p.sum1(k), p.sum2(k),
                       p.block1(k), p.block2(k));
      } else {
        grad_stats_bf16(x.const_data_ptr<bf16>() + r * C, dy.const_data_ptr<bf16>() + r * C, n,
                        t, sc.data(), sh.data(), mr.data(), relu, p.sum1(k), p.sum2(k),
                        p.block1(k), p.block2(k));
      }
    });
    std::vector<double> g1, g2;  // Σ g and Σ g·(x − mean)
    p.total(g1, g2);
    // dx = scale·(g − Σg/M − x̂·Σg·x̂/M) with x̂ = (x − mean)·invstd, expanded to a·g + b·x + k.
    std::vector<float> a(C), b(C), k(C);
    at::Tensor dweight = at::empty({C}, weight.options());
    at::Tensor dbias = at::empty({C}, weight.options());
    for (int64_t c = 0; c < C; ++c) {
      const double sg = g1[c], sgx = g2[c] * is[c];  // Σg, Σ g·x̂
      const double s = sc1[c], m = double(M);
      a[c] = float(s);
      b[c] = float(-s * is[c] * sgx / m);
      k[c] = float(-s * sg / m + s * is[c] * sgx * mu[c] / m);
      dweight.data_ptr<float>()[c] = float(sgx);
      dbias.data_ptr<float>()[c] = float(sg);
    }
    const auto ar = t.repeat(a.data()), br = t.repeat(b.data()), kr = t.repeat(k.data());
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    over_rows(M, ch, [&](int64_t r, int64_t n, int) {
      if (x.scalar_type() == at::kFloat) {
        grad_input_f32(x.const_data_ptr<float>() + r * C, dy.const_data_ptr<float>() + r * C,
                       dx.data_ptr<float>() + r * C, n, t, sc.data(), sh.data(), relu, ar.data(),
                       br.data(), kr.data());
      } else {
        grad_input_bf16(x.const_data_ptr<bf16>() + r * C, dy.const_data_ptr<bf16>() + r * C,
                        dx.data_ptr<bf16>() + r * C, n, t, sc.data(), sh.data(), relu, ar.data(),
                        br.data(), kr.data());
      }
    });
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Training-mode batch norm (+ ReLU): batch statistics, running-statistics update, then the
// autograd function above.
at::Tensor bn_relu_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& running_mean, const at::Tensor& running_var,
                         double momentum, double eps, bool relu) {
  check_input(x, weight);
  const int64_t C = x.size(1), M = x.numel() / C;
  TORCH_CHECK(M > 1, "fused batch norm: more than one value per channel is needed in training");
  const Tiling t(C);
  const Chunks ch(M, t);
  at::Tensor shift_t = running_mean.detach().to(at::kFloat).contiguous();
  const float* shift = shift_t.const_data_ptr<float>();
  const auto shr = t.repeat(shift);
  Partials p(t, ch);
  const at::Tensor xd = x.detach();
  over_rows(M, ch, [&](int64_t r, int64_t n, int k) {
    if (xd.scalar_type() == at::kFloat) {
      stats_f32(xd.const_data_ptr<float>() + r * C, n, t, shr.data(), p.sum1(k), p.sum2(k),
                p.block1(k), p.block2(k));
    } else {
      stats_bf16(xd.const_data_ptr<bf16>() + r * C, n, t, shr.data(), p.sum1(k), p.sum2(k),
                 p.block1(k), p.block2(k));
    }
  });
  std::vector<double> sum, sumsq;
  p.total(sum, sumsq);
  at::Tensor mean = at::empty({C}, weight.options());
  at::Tensor invstd = at::empty({C}, weight.options());
  at::Tensor var_unbiased = at::empty({C}, weight.options());
  for (int64_t c = 0; c < C; ++c) {
    const double d = sum[c] / double(M);
    const double var = std::max(sumsq[c] / double(M) - d * d, 0.0);
    mean.data_ptr<float>()[c] = float(shift[c] + d);
    invstd.data_ptr<float>()[c] = float(1.0 / std::sqrt(var + eps));
    var_unbiased.data_ptr<float>()[c] = float(var * double(M) / double(M - 1));
  }
  {
    at::NoGradGuard no_grad;
    running_mean.mul_(1.0 - momentum).add_(mean, momentum);
    running_var.mul_(1.0 - momentum).add_(var_unbiased, momentum);
  }
  return BnReluFn::apply(x, weight, bias, mean, invstd, relu);
}

}  // namespace

extern "C" {

// Training-mode batch norm of a channels_last CPU tensor, followed by a ReLU when `relu`; the
// running statistics are updated in place. NULL on success (the result in *out), else a malloc'ed
// message for tricks_dist_free_error.
char* tricks_bn_relu_train(at::Tensor* x, at::Tensor* weight, at::Tensor* bias,
                           at::Tensor* running_mean, at::Tensor* running_var, double momentum,
                           double eps, bool relu, at::Tensor** out) {
  return tricks::guarded([&] {
    *out = new at::Tensor(
        bn_relu_train(*x, *weight, *bias, *running_mean, *running_var, momentum, eps, relu));
  });
}

}  // extern "C"
