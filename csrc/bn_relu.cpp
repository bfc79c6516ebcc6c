// Fused batch norm + ReLU, batch norm + residual add + ReLU, and batch norm + GELU (airbench94's
// network), for CPU training and inference in channels_last layout (f32 or bf16 activations, f32
// parameters and statistics, as under bf16 autocast).
//
// Why: on a CPU, libtorch's training-mode batch norm and ReLU are separate kernels that together
// pass over the activation 13 times per step (norm forward 3, ReLU forward 2, ReLU backward 3,
// norm backward 5); batch norm and ReLU were about a third of a CIFAR ResNet-20 bf16 step in
// PyTorch's profile. Here it is 8: the forward pass reads x twice and writes y once; the backward
// pass recomputes the ReLU mask from x (no saved output), reads x and dy twice and writes dx once.
// At the end of a residual block (batch norm, add the shortcut, ReLU) it is 11 passes instead of
// 16 (see BnReluFn). Batch norm then GELU: 9 instead of 13 (the backward pass writes GELU's
// gradient once, as the residual's gradient is written, since recomputing it costs an exp and a
// division per value). In inference it is one pass (bn_eval).
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
#include <optional>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// flatten: the tile loops' lambdas must be inlined into each clone, or they are compiled once for
// baseline x86-64 (a lambda does not inherit the clone's target) and the AVX clones run SSE code;
// this happened, unseen, when a lambda grew a switch (measured 0.87x, fixed by this).
#define TRICKS_CLONES                                                                     \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define TRICKS_CLONES __attribute__((flatten))
#endif
#define TRICKS_INLINE __attribute__((always_inline)) inline

using bf16 = c10::BFloat16;

TRICKS_INLINE float bits_to_f(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
TRICKS_INLINE uint32_t f_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

TRICKS_INLINE float to_f(float v) { return v; }
TRICKS_INLINE float to_f(bf16 v) { return bits_to_f(uint32_t(v.x) << 16); }
template <typename T>
TRICKS_INLINE T from_f(float f);
template <>
TRICKS_INLINE float from_f<float>(float f) {
  return f;
}
template <>
TRICKS_INLINE bf16 from_f<bf16>(float f) {
  const uint32_t u = f_to_bits(f);
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

// How the normalised value ends: as it is, through a ReLU, added to a residual then through a ReLU
// (the end of a residual block), or through GELU.
enum class Epilogue { None, Relu, AddRelu, Gelu };

// exp(x) for -100 <= x <= 0 (or NaN), in a form the compiler vectorises for every target here
// (libm's expf is a call it cannot vectorise, and a clamp on x becomes a branch on AVX2): x =
// n·ln2 + r with |r| <= ln2/2 (n rounded by adding 1.5·2^23), Cephes' polynomial for exp(r), 2^n
// from the exponent bits, 0 where 2^n is below f32's normal range. Relative error about 1e-7.
TRICKS_INLINE float exp_nonpositive(float x) {
  const float t = x * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  int32_t k = int32_t(n) + 127;
  k = k < 1 ? 0 : k;
  return e * bits_to_f(uint32_t(k) << 23);
}

// Exact GELU, v·Φ(v) = v·½(1 + erf(v/√2)), and its derivative Φ(v) + v·φ(v), with erf as
// libtorch's vectorised CPU kernel computes it (Abramowitz & Stegun 7.1.26, absolute error
// < 1.5e-7); one exp(−v²/2) serves both erf and φ. |v/√2| is capped at 10 (as integers: a float
// min is a branch without -ffast-math), where erf is 1 and φ 0 in f32; a NaN v stays NaN through
// the factor v.
struct GeluTerms {
  float cdf, pdf;
};
TRICKS_INLINE GeluTerms gelu_terms(float v) {
  const float z = v * 0.70710678118654752f;
  const uint32_t az_bits = f_to_bits(z) & 0x7FFFFFFFu;
  const uint32_t cap = 0x41200000u;  // 10.0f
  const float az = bits_to_f(az_bits < cap ? az_bits : cap);
  const float t = 1.f / (1.f + 0.3275911f * az);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float e = exp_nonpositive(-az * az);
  const float erf_abs = 1.f - r * t * e;
  const float erf = bits_to_f(f_to_bits(erf_abs) | (f_to_bits(z) & 0x80000000u));
  return {0.5f * (1.f + erf), e * 0.39894228040143268f};
}
TRICKS_INLINE float gelu(float v) { return v * gelu_terms(v).cdf; }
TRICKS_INLINE float gelu_grad(float v) {
  const GeluTerms g = gelu_terms(v);
  return g.cdf + v * g.pdf;
}

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

// y = E(x·scale + shift): the epilogue E adds the residual r and takes max(·, 0) (AddRelu),
// takes max(·, 0) (Relu) or GELU (Gelu).
template <typename T, Epilogue E>
TRICKS_INLINE void norm_span(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                             int64_t n, const float* __restrict__ scale,
                             const float* __restrict__ shift) {
  for (int64_t j = 0; j < n; ++j) {
    float v = to_f(x[j]) * scale[j] + shift[j];
    if (E == Epilogue::AddRelu) v += to_f(r[j]);
    if (E == Epilogue::Relu || E == Epilogue::AddRelu) v = v > 0.f ? v : 0.f;
    if (E == Epilogue::Gelu) v = gelu(v);
    y[j] = from_f<T>(v);
  }
}

// With g the gradient of the batch norm's output (dy where the forward output was positive
// with a ReLU, the mask recomputed from x and from the residual r; dy·GELU'(v) with GELU; dy
// itself without an epilogue): a1 += g and a2 += g·(x − mean), value by value. With AddRelu, g
// is also the residual's gradient, and with Gelu the input gradient pass's; both are written to
// dr.
template <typename T, Epilogue E>
TRICKS_INLINE void grad_stats_span(const T* __restrict__ x, const T* __restrict__ r,
                                   const T* __restrict__ dy, T* __restrict__ dr, int64_t n,
                                   const float* __restrict__ scale,
                                   const float* __restrict__ shift,
                                   const float* __restrict__ mean, float* __restrict__ a1,
                                   float* __restrict__ a2) {
  for (int64_t j = 0; j < n; ++j) {
    float xv = to_f(x[j]);
    float g = to_f(dy[j]);
    float v = xv * scale[j] + shift[j];
    if (E == Epilogue::AddRelu) v += to_f(r[j]);
    if (E == Epilogue::Relu || E == Epilogue::AddRelu) g = v > 0.f ? g : 0.f;
    if (E == Epilogue::AddRelu) dr[j] = from_f<T>(g);  // exact: g is dy or 0
    if (E == Epilogue::Gelu) {
      // Rounded to T first, as libtorch's GELU backward hands it to the batch norm's: the sums
      // and the input gradient pass (which reads dr) then see the same values.
      // (Not through a T local: its copy stops GCC vectorising the bf16 loop.)
      const float gv = g * gelu_grad(v);
      dr[j] = from_f<T>(gv);
      g = to_f(from_f<T>(gv));
    }
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
// `r` (the residual) is read with Epilogue::AddRelu only, `dr` (the gradient of the batch norm's
// output) written with AddRelu and Gelu. The input gradient pass never masks with AddRelu: it is
// given the masked gradient, dr.
#define TRICKS_DEFINE_KERNELS(T, SUFFIX)                                                          \
  TRICKS_CLONES void stats_##SUFFIX(const T* x, int64_t rows, const Tiling& t,                    \
                                    const float* shift, double* s1, double* s2, float* a1,        \
                                    float* a2) {                                                  \
    over_tiles(                                                                                   \
        rows, t, [&](int64_t o, int64_t n) { stats_span<T>(x + o, n, shift, a1, a2); },           \
        [&] { fold(t, a1, a2, s1, s2); });                                                        \
  }                                                                                               \
  TRICKS_CLONES void norm_##SUFFIX(const T* x, const T* r, T* y, int64_t rows, const Tiling& t,   \
                                   const float* scale, const float* shift, Epilogue e) {          \
    over_tiles(                                                                                   \
        rows, t,                                                                                  \
        [&](int64_t o, int64_t n) {                                                               \
          switch (e) {                                                                            \
            case Epilogue::None:                                                                  \
              return norm_span<T, Epilogue::None>(x + o, nullptr, y + o, n, scale, shift);        \
            case Epilogue::Relu:                                                                  \
              return norm_span<T, Epilogue::Relu>(x + o, nullptr, y + o, n, scale, shift);        \
            case Epilogue::AddRelu:                                                               \
              return norm_span<T, Epilogue::AddRelu>(x + o, r + o, y + o, n, scale, shift);       \
            case Epilogue::Gelu:                                                                  \
              return norm_span<T, Epilogue::Gelu>(x + o, nullptr, y + o, n, scale, shift);        \
          }                                                                                       \
        },                                                                                        \
        [] {});                                                                                   \
  }                                                                                               \
  TRICKS_CLONES void grad_stats_##SUFFIX(const T* x, const T* r, const T* dy, T* dr,             \
                                         int64_t rows, const Tiling& t, const float* scale,       \
                                         const float* shift, const float* mean, Epilogue e,       \
                                         double* s1, double* s2, float* a1, float* a2) {          \
    over_tiles(                                                                                   \
        rows, t,                                                                                  \
        [&](int64_t o, int64_t n) {                                                               \
          switch (e) {                                                                            \
            case Epilogue::None:                                                                  \
              return grad_stats_span<T, Epilogue::None>(x + o, nullptr, dy + o, nullptr, n,       \
                                                        scale, shift, mean, a1, a2);              \
            case Epilogue::Relu:                                                                  \
              return grad_stats_span<T, Epilogue::Relu>(x + o, nullptr, dy + o, nullptr, n,       \
                                                        scale, shift, mean, a1, a2);              \
            case Epilogue::AddRelu:                                                               \
              return grad_stats_span<T, Epilogue::AddRelu>(x + o, r + o, dy + o, dr + o, n,       \
                                                           scale, shift, mean, a1, a2);           \
            case Epilogue::Gelu:                                                                  \
              return grad_stats_span<T, Epilogue::Gelu>(x + o, nullptr, dy + o, dr + o, n, scale, \
                                                        shift, mean, a1, a2);                     \
          }                                                                                       \
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

void check_input(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& residual,
                 Epilogue e) {
  TORCH_CHECK(residual.defined() == (e == Epilogue::AddRelu),
              "fused batch norm: a residual goes with the add + ReLU epilogue, and only with it");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fused batch norm: a 4-D CPU tensor is needed");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "fused batch norm: f32 or bf16 activations are needed");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fused batch norm: a channels_last tensor is needed");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "fused batch norm: f32 parameters of one value per channel are needed");
  if (residual.defined()) {
    TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                    residual.device().is_cpu() &&
                    residual.is_contiguous(at::MemoryFormat::ChannelsLast),
                "fused batch norm: the residual must be a channels_last CPU tensor of the input's "
                "shape and dtype");
  }
}

// A typed pointer to the data of an optional tensor (nullptr when undefined).
template <typename T>
const T* ptr_or_null(const at::Tensor& t, int64_t offset) {
  return t.defined() ? t.const_data_ptr<T>() + offset : nullptr;
}
template <typename T>
T* mut_ptr_or_null(at::Tensor& t, int64_t offset) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// y = epilogue((x − mean)·invstd·weight + bias), as x·scale + shift with libtorch's CPU batch
// norm's scale = weight·invstd and shift = bias − mean·scale; f32 statistics and parameters.
at::Tensor normalise(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     Epilogue e) {
  const int64_t C = x.size(1), M = x.numel() / C;
  const Tiling t(C);
  const Chunks ch(M, t);
  const at::Tensor scale = (weight.detach() * invstd).contiguous();
  const at::Tensor shift = (bias.detach() - mean * scale).contiguous();
  const auto sc = t.repeat(scale.const_data_ptr<float>());
  const auto sh = t.repeat(shift.const_data_ptr<float>());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  over_rows(M, ch, [&](int64_t r, int64_t n, int) {
    if (x.scalar_type() == at::kFloat) {
      norm_f32(x.const_data_ptr<float>() + r * C, ptr_or_null<float>(residual, r * C),
               y.data_ptr<float>() + r * C, n, t, sc.data(), sh.data(), e);
    } else {
      norm_bf16(x.const_data_ptr<bf16>() + r * C, ptr_or_null<bf16>(residual, r * C),
                y.data_ptr<bf16>() + r * C, n, t, sc.data(), sh.data(), e);
    }
  });
  return y;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Normalisation with given batch statistics, then the epilogue (ReLU, residual add + ReLU, GELU);
// its backward is the training-mode batch norm gradient (the statistics depend on x), with the
// ReLU mask or GELU's derivative recomputed from x (and the residual) rather than saved.
//
// With a residual (the end of a residual block: relu(bn(x) + r)), libtorch's batch norm, add and
// ReLU pass over the activation 16 times per step; here 11: the forward pass reads x twice and r
// once and writes y once; the backward pass reads x, r and dy and writes dr (the masked gradient,
// which is also the gradient of bn's output), then reads x and dr and writes dx.
class BnReluFn : public torch::autograd::Function<BnReluFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean,
                            const at::Tensor& invstd,
                            const std::optional<at::Tensor>& residual_or_none, int64_t epilogue) {
    // Optional, not an undefined tensor: autograd rejects undefined tensor inputs.
    const at::Tensor residual = residual_or_none.value_or(at::Tensor());
    const Epilogue e = Epilogue(epilogue);
    at::Tensor y = normalise(x, residual, weight, bias, mean, invstd, e);
    ctx->save_for_backward({x, weight, bias, mean, invstd, residual});
    ctx->saved_data["epilogue"] = epilogue;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3],
                     &invstd = saved[4], &residual = saved[5];
    const Epilogue e = Epilogue(ctx->saved_data["epilogue"].toInt());
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
    // The gradient of the batch norm's output where the epilogue makes one to keep: the residual's
    // (dy where the output was positive), or dy·GELU'.
    at::Tensor dr;
    if (e == Epilogue::AddRelu || e == Epilogue::Gelu) {
      dr = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    }
    Partials p(t, ch);
    over_rows(M, ch, [&](int64_t r, int64_t n, int k) {
      if (x.scalar_type() == at::kFloat) {
        grad_stats_f32(x.const_data_ptr<float>() + r * C, ptr_or_null<float>(residual, r * C),
                       dy.const_data_ptr<float>() + r * C, mut_ptr_or_null<float>(dr, r * C), n,
                       t, sc.data(), sh.data(), mr.data(), e, p.sum1(k), p.sum2(k), p.block1(k),
                       p.block2(k));
      } else {
        grad_stats_bf16(x.const_data_ptr<bf16>() + r * C, ptr_or_null<bf16>(residual, r * C),
                        dy.const_data_ptr<bf16>() + r * C, mut_ptr_or_null<bf16>(dr, r * C), n,
                        t, sc.data(), sh.data(), mr.data(), e, p.sum1(k), p.sum2(k),
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
    // With a residual or GELU, g is dr, already masked or multiplied; otherwise dy, masked here
    // when there is a ReLU.
    const at::Tensor& g = dr.defined() ? dr : dy;
    const bool mask = e == Epilogue::Relu;
    at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
    over_rows(M, ch, [&](int64_t r, int64_t n, int) {
      if (x.scalar_type() == at::kFloat) {
        grad_input_f32(x.const_data_ptr<float>() + r * C, g.const_data_ptr<float>() + r * C,
                       dx.data_ptr<float>() + r * C, n, t, sc.data(), sh.data(), mask, ar.data(),
                       br.data(), kr.data());
      } else {
        grad_input_bf16(x.const_data_ptr<bf16>() + r * C, g.const_data_ptr<bf16>() + r * C,
                        dx.data_ptr<bf16>() + r * C, n, t, sc.data(), sh.data(), mask, ar.data(),
                        br.data(), kr.data());
      }
    });
    const at::Tensor dresidual = e == Epilogue::AddRelu ? dr : at::Tensor();
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), dresidual, at::Tensor()};
  }
};

// Training-mode batch norm and its epilogue: batch statistics, running-statistics update, then the
// autograd function above.
at::Tensor bn_relu_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& running_mean, const at::Tensor& running_var,
                         double momentum, double eps, Epilogue e, const at::Tensor& residual) {
  check_input(x, weight, residual, e);
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
  return BnReluFn::apply(x, weight, bias, mean, invstd,
                         residual.defined() ? std::optional<at::Tensor>(residual) : std::nullopt,
                         int64_t(e));
}

// Inference-mode batch norm (running statistics) and its epilogue in one pass: x (and the
// residual) read once, y written once, where libtorch's batch norm, ReLU and add pass 2 + 2 + 3
// times. It builds no autograd graph, so it declines (an undefined result) where one is needed:
// grad mode on and an input or parameter requiring grad (eval-mode BN inside training).
at::Tensor bn_eval(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                   Epilogue e, const at::Tensor& residual) {
  check_input(x, weight, residual, e);
  const bool needs_graph =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || bias.requires_grad() ||
       (residual.defined() && residual.requires_grad()));
  if (needs_graph) return at::Tensor();
  const at::Tensor invstd = (running_var.detach().to(at::kFloat) + eps).rsqrt();
  return normalise(x, residual, weight, bias, running_mean.detach().to(at::kFloat), invstd, e);
}

}  // namespace

extern "C" {

// Batch norm of a channels_last CPU tensor (training mode: batch statistics, running statistics
// updated in place; else the running statistics), then `epilogue`: 0 none, 1 ReLU, 2 add
// `residual` (NULL otherwise) then ReLU, 3 GELU. NULL on success, with the result in *out, or
// *out NULL where an inference-mode call needs an autograd graph (use libtorch's); else a
// malloc'ed message for tricks_dist_free_error.
char* tricks_bn_fused(at::Tensor* x, at::Tensor* weight, at::Tensor* bias, at::Tensor* running_mean,
                      at::Tensor* running_var, bool train, double momentum, double eps,
                      int32_t epilogue, at::Tensor* residual, at::Tensor** out) {
  return tricks::guarded([&] {
    TORCH_CHECK(epilogue >= 0 && epilogue <= 3, "fused batch norm: unknown epilogue ", epilogue);
    const at::Tensor none;
    const at::Tensor& r = residual ? *residual : none;
    at::Tensor y = train ? bn_relu_train(*x, *weight, *bias, *running_mean, *running_var,
                                         momentum, eps, Epilogue(epilogue), r)
                         : bn_eval(*x, *weight, *bias, *running_mean, *running_var, eps,
                                   Epilogue(epilogue), r);
    *out = y.defined() ? new at::Tensor(std::move(y)) : nullptr;
  });
}

}  // extern "C"
