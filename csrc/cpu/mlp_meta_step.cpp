// The meta-step for small multilayer perceptrons on the CPU: Linear and ReLU layers with softmax
// cross-entropy or mean-squared error, as the paper's sinusoid net (1-40-40-1). Each task's whole
// meta-step (K inner steps, the query pass, the reverse sweep with its Hessian-vector products)
// runs as plain loops over raw memory on one thread, tasks in parallel. At these sizes the general
// path's ~130 ATen calls per meta-step cost more than their arithmetic (a few µs of dispatch and
// allocation each, against ~0.1 µs of multiply-adds); here a meta-step allocates its outputs and
// nothing else. The mathematics is csrc/meta_step.cpp's and shared/TANGENTS.md's, the contract
// meta_step.h's; python_tests/test_mlp_path.py checks both against the reference.
#include "mlp_meta_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../kernels/softmax_cross_entropy_math.h"
#include "../layers.h"
#include "../meta_step.h"

// The matrix products are compiled twice, for AVX2 + FMA and for baseline x86-64, and picked at run
// time by what the CPU supports: the extension is built without -march, and 8-wide vectors run
// these 40-wide products much faster than SSE2's four. Only they are: the rest of a pass is a few
// element-wise loops, and one copy of it keeps the code small enough for the instruction cache.
#if defined(__GNUC__) && defined(__x86_64__)
#define MAML_AVX2_VERSION 1
#endif
// The vector helpers below return vectors by value; they are always inlined, so the ABI note GCC
// gives for the baseline build (no AVX registers to return them in) does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__GNUC__)
#define MAML_INLINE inline __attribute__((always_inline))
#define MAML_NOINLINE __attribute__((noinline))
#else
#define MAML_INLINE inline
#define MAML_NOINLINE
#endif

namespace maml_ext {
namespace cpu {
namespace {

// Widths above this go to the general path, whose matrix products (MKL / oneDNN) win once a layer
// is large enough to amortise their call overhead.
constexpr int64_t kMaxWidth = 128;

struct MlpLayer {
  bool linear;  // otherwise ReLU
  int64_t in, out;
  bool bias;
  int64_t weight_offset, bias_offset;
};

struct Mlp {
  std::vector<MlpLayer> layers;
  int64_t max_width = 0;
  int64_t output_width = 0;
  int64_t activation_floats = 0;  // Σ over layers of the output width (per sample)
};

// The program as an MLP, or false if it holds another layer or widths that do not chain.
bool parse_mlp(at::IntArrayRef ints, int64_t input_width, Mlp& mlp) {
  int64_t width = input_width;
  mlp.max_width = width;
  size_t i = 0;
  bool any_linear = false;
  while (i < ints.size()) {
    const auto kind = static_cast<LayerKind>(ints[i]);
    if (kind == LayerKind::kReLU) {
      mlp.layers.push_back({false, width, width, false, 0, 0});
      i += 1;
    } else if (kind == LayerKind::kLinear) {
      if (i + 6 > ints.size() || ints[i + 1] != width) return false;
      const int64_t out = ints[i + 2];
      mlp.layers.push_back({true, width, out, ints[i + 3] != 0, ints[i + 4], ints[i + 5]});
      width = out;
      any_linear = true;
      i += 6;
    } else {
      return false;
    }
    mlp.max_width = std::max(mlp.max_width, width);
    mlp.activation_floats += width;
  }
  mlp.output_width = width;
  return any_linear;
}

// ---- small dense kernels on row-major matrices -----------------------------------------------

// One 32-byte vector of T (GCC vector extensions: AVX in the AVX2 build, two SSE halves in the
// baseline one).
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using Vec = Float8;
};
template <>
struct Simd<double> {
  using Vec = Double4;
};
template <typename T>
constexpr int kLanes = static_cast<int>(32 / sizeof(T));

template <typename T>
MAML_INLINE typename Simd<T>::Vec load(const T* p) {
  typename Simd<T>::Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
MAML_INLINE void store(T* p, typename Simd<T>::Vec v) {
  std::memcpy(p, &v, sizeof v);
}

// C[R, V vectors] (+)= Σ_k A[r, k] B[k, :] for one block: the R × V vector sums stay in registers
// across k, so each step loads V vectors of B's row once for R rows of A.
// A's element (r, k) is a[r * lda + k * a_step]; B's row k starts at b + k * ldb.
template <int R, int V, typename T>
MAML_INLINE void gemm_block(const T* __restrict__ a, int64_t lda, int64_t a_step,
                            const T* __restrict__ b, int64_t ldb, T* __restrict__ c, int64_t ldc,
                            int64_t depth, bool accumulate) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = kLanes<T>;
  Vec sums[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) sums[r][v] = accumulate ? load(c + r * ldc + v * L) : Vec{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec row[V];
    for (int v = 0; v < V; ++v) row[v] = load(b + k * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec scale = Vec{} + a[r * lda + k * a_step];
      for (int v = 0; v < V; ++v) sums[r][v] += scale * row[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) store(c + r * ldc + v * L, sums[r][v]);
  }
}

// The same for one column (the remainder after whole vectors).
template <int R, typename T>
MAML_INLINE void gemm_column(const T* __restrict__ a, int64_t lda, int64_t a_step,
                             const T* __restrict__ b, int64_t ldb, T* __restrict__ c, int64_t ldc,
                             int64_t depth, bool accumulate) {
  T sums[R];
  for (int r = 0; r < R; ++r) sums[r] = accumulate ? c[r * ldc] : T(0);
  for (int64_t k = 0; k < depth; ++k) {
    for (int r = 0; r < R; ++r) sums[r] += a[r * lda + k * a_step] * b[k * ldb];
  }
  for (int r = 0; r < R; ++r) c[r * ldc] = sums[r];
}

template <int R, typename T>
MAML_INLINE void gemm_rows(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c,
                           int64_t ldc, int64_t cols, int64_t depth, bool accumulate) {
  constexpr int L = kLanes<T>;
  int64_t col = 0;
  for (; col + 2 * L <= cols; col += 2 * L) {
    gemm_block<R, 2>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate);
  }
  for (; col + L <= cols; col += L) {
    gemm_block<R, 1>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate);
  }
  for (; col < cols; ++col) {
    gemm_column<R>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate);
  }
}

// C[rows, cols] (+)= A[rows, depth] B[depth, cols], A strided as in gemm_block, B and C row-major.
template <typename T>
MAML_INLINE void gemm_kernel(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c,
                      int64_t ldc, int64_t rows, int64_t cols, int64_t depth, bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    gemm_rows<4>(a + r * lda, lda, a_step, b, ldb, c + r * ldc, ldc, cols, depth, accumulate);
  }
  if (r + 2 <= rows) {
    gemm_rows<2>(a + r * lda, lda, a_step, b, ldb, c + r * ldc, ldc, cols, depth, accumulate);
    r += 2;
  }
  for (; r < rows; ++r) {
    gemm_rows<1>(a + r * lda, lda, a_step, b, ldb, c + r * ldc, ldc, cols, depth, accumulate);
  }
}

template <typename T>
MAML_NOINLINE void gemm_baseline(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb,
                                 T* c, int64_t ldc, int64_t rows, int64_t cols, int64_t depth,
                                 bool accumulate) {
  gemm_kernel(a, lda, a_step, b, ldb, c, ldc, rows, cols, depth, accumulate);
}

#ifdef MAML_AVX2_VERSION
template <typename T>
MAML_NOINLINE __attribute__((target("avx2,fma"))) void gemm_avx2(
    const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c, int64_t ldc,
    int64_t rows, int64_t cols, int64_t depth, bool accumulate) {
  gemm_kernel(a, lda, a_step, b, ldb, c, ldc, rows, cols, depth, accumulate);
}
#endif

template <typename T>
void gemm(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c, int64_t ldc,
          int64_t rows, int64_t cols, int64_t depth, bool accumulate) {
#ifdef MAML_AVX2_VERSION
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return gemm_avx2(a, lda, a_step, b, ldb, c, ldc, rows, cols, depth, accumulate);
#endif
  gemm_baseline(a, lda, a_step, b, ldb, c, ldc, rows, cols, depth, accumulate);
}

// y[n, out] (+)= x[n, in] · Wᵀ + b, with Wᵀ given as wt[in, out].
template <typename T>
void times_transposed(const T* __restrict__ x, const T* __restrict__ wt,
                                  const T* __restrict__ b, T* __restrict__ y, int64_t n,
                                  int64_t in, int64_t out, bool accumulate) {
  if (b) {
    for (int64_t r = 0; r < n; ++r) {
      T* __restrict__ yr = y + r * out;
      for (int64_t o = 0; o < out; ++o) yr[o] = (accumulate ? yr[o] : T(0)) + b[o];
    }
  }
  gemm(x, in, 1, wt, out, y, out, n, out, in, accumulate || b);
}

// gx[n, in] (+)= gy[n, out] · W, W given as w[out, in].
template <typename T>
void times_weight(const T* __restrict__ gy, const T* __restrict__ w,
                              T* __restrict__ gx, int64_t n, int64_t in, int64_t out,
                              bool accumulate) {
  gemm(gy, out, 1, w, in, gx, in, n, in, out, accumulate);
}

// gw[out, in] (+)= gy[n, out]ᵀ · x[n, in]; gb[out] (+)= Σ_n gy.
template <typename T>
void weight_gradient(const T* __restrict__ gy, const T* __restrict__ x,
                                 T* __restrict__ gw, T* __restrict__ gb, int64_t n, int64_t in,
                                 int64_t out, bool accumulate) {
  gemm(gy, 1, out, x, in, gw, in, out, in, n, accumulate);
  if (gb) {
    if (!accumulate) std::fill(gb, gb + out, T(0));
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t o = 0; o < out; ++o) gb[o] += gy[r * out + o];
    }
  }
}

template <typename T>
void transpose(const T* __restrict__ w, T* __restrict__ wt, int64_t out, int64_t in) {
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) wt[i * out + o] = w[o * in + i];
  }
}

// ---- one task --------------------------------------------------------------------------------

// Everything one task's meta-step reads and writes; pointers into the op's tensors.
template <typename T>
struct Problem {
  const Mlp* mlp;
  LossKind loss;
  int64_t params, steps, input_width, support_n, query_n;
  bool first_order;
  const T* theta;         // [P] shared θ
  const T* alpha;         // [K, P]
  const T* support_x;     // [T, Ns, F]
  const T* query_x;       // [T, Nq, F]
  const int64_t* support_labels;  // [T, Ns] (cross-entropy) or null
  const int64_t* query_labels;
  const T* support_targets;       // [T, Ns, D] (mean-squared error) or null
  const T* query_targets;
  T* query_loss;          // [T]
  T* query_accuracy;      // [T] or null
  T* support_loss;        // [T]
  T* lambda;              // [T, P]: each task's meta-gradient, averaged by the caller
  T* rate_products;       // [T, K, P]: λ_{k+1} ⊙ g_k, for the rate gradient; or null
};

// Per-thread scratch, reused across tasks and calls (grown, never shrunk).
template <typename T>
struct Workspace {
  std::vector<T> buffer;
  T *adapted, *grads, *direction, *hessian_vector, *wt, *vt, *acts, *tangents, *g[2], *rg[2];
  // Per inner step k: the support pass's layer outputs and the loss gradient at each of them,
  // which the Hessian-vector pass at θ_k reuses instead of recomputing.
  T *tape_outputs, *tape_grads;
  int64_t tape_stride;

  void prepare(const Problem<T>& pb) {
    const int64_t P = pb.params, K = pb.steps;
    const int64_t rows = std::max(pb.support_n, pb.query_n);
    const int64_t act = rows * pb.mlp->activation_floats, wide = rows * pb.mlp->max_width;
    tape_stride = pb.support_n * pb.mlp->activation_floats;
    const size_t need =
        static_cast<size_t>(2 * K * P + 4 * P + 2 * act + 4 * wide + 2 * K * tape_stride);
    if (buffer.size() < need) buffer.assign(need, T(0));
    T* p = buffer.data();
    auto take = [&p](int64_t n) { T* q = p; p += n; return q; };
    adapted = take(K * P);
    grads = take(K * P);
    direction = take(P);
    hessian_vector = take(P);
    wt = take(P);
    vt = take(P);
    acts = take(act);
    tangents = take(act);
    for (auto& b : g) b = take(wide);
    for (auto& b : rg) b = take(wide);
    tape_outputs = take(K * tape_stride);
    tape_grads = take(K * tape_stride);
  }
};

// Where a pass keeps its layer outputs and the gradients at them: nowhere beyond the pass
// (record == nullptr), recorded on a tape for a later pass at the same weights and data, or
// replayed from such a tape (the primal forward and input gradients are then not recomputed).
template <typename T>
struct TapeUse {
  T* outputs = nullptr;  // [n, Σ widths]: each layer's output, layer after layer
  T* grads = nullptr;    // the same layout: the loss gradient at each layer's output
  bool replay = false;
};

// One forward + backward at weights theta on (x, labels | targets) of n samples: writes the
// gradient to grad (if given) and, carrying the tangent v, H v to hv. Returns the mean loss.
template <typename T>
T pass(const Problem<T>& pb, Workspace<T>& ws, const T* theta, const T* v, const T* x, int64_t n,
       const int64_t* labels, const T* targets, T* grad, T* hv, T* accuracy,
       TapeUse<T> tape = {}) {
  const auto& layers = pb.mlp->layers;
  const size_t depth = layers.size();
  // Inputs of each layer and their tangents (null: zero tangent), kept for the backward pass.
  const T* inputs[64];
  const T* input_tangents[64];
  for (const auto& layer : layers) {
    if (!layer.linear) continue;
    transpose(theta + layer.weight_offset, ws.wt + layer.weight_offset, layer.out, layer.in);
    if (v) transpose(v + layer.weight_offset, ws.vt + layer.weight_offset, layer.out, layer.in);
  }
  const bool replay = tape.replay;
  const T* h = x;
  const T* rh = nullptr;
  T* act = tape.outputs ? tape.outputs : ws.acts;
  T* tan = ws.tangents;
  int64_t offsets[64];  // of each layer's output within act (and within tape.grads)
  for (size_t l = 0; l < depth; ++l) {
    const auto& L = layers[l];
    inputs[l] = h;
    input_tangents[l] = rh;
    offsets[l] = act - (tape.outputs ? tape.outputs : ws.acts);
    const int64_t size = n * L.out;
    if (L.linear) {
      if (!replay) {
        times_transposed(h, ws.wt + L.weight_offset, L.bias ? theta + L.bias_offset : nullptr,
                         act, n, L.in, L.out, false);
      }
      if (v) {
        // R{y} = x Vᵀ + v_b + R{x} Wᵀ
        times_transposed(h, ws.vt + L.weight_offset, L.bias ? v + L.bias_offset : nullptr, tan, n,
                         L.in, L.out, false);
        if (rh) {
          times_transposed(rh, ws.wt + L.weight_offset, static_cast<const T*>(nullptr), tan, n,
                           L.in, L.out, true);
        }
        rh = tan;
      }
    } else {
      if (!replay) {
        for (int64_t e = 0; e < size; ++e) act[e] = h[e] > T(0) ? h[e] : T(0);
      }
      if (rh) {
        for (int64_t e = 0; e < size; ++e) tan[e] = h[e] > T(0) ? rh[e] : T(0);
        rh = tan;
      }
    }
    h = act;
    act += size;
    tan += size;
  }

  // The loss at the outputs z = h [n, D]: gradient gz and, with a tangent, R{gz}.
  const int64_t D = pb.mlp->output_width;
  T* gy = tape.grads ? tape.grads + offsets[depth - 1] : ws.g[0];
  T* rgy = ws.rg[0];
  if (v && !rh) std::fill(rgy, rgy + n * D, T(0));  // outputs independent of θ: zero tangent
  T total = 0;
  if (pb.loss == LossKind::kCrossEntropy) {
    const T inv_n = T(1) / static_cast<T>(n);
    T correct_sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      T correct = 0;
      total += kernels::softmax_cross_entropy_row<T>(h + r * D, rh ? rh + r * D : nullptr,
                                                     labels[r], D, gy + r * D,
                                                     rh ? rgy + r * D : nullptr, &correct);
      correct_sum += correct;
    }
    for (int64_t e = 0; e < n * D; ++e) gy[e] *= inv_n;
    if (rh) {
      for (int64_t e = 0; e < n * D; ++e) rgy[e] *= inv_n;
    }
    if (accuracy) *accuracy = correct_sum * inv_n;
    total *= inv_n;
  } else {
    const T scale = T(2) / static_cast<T>(n * D);
    for (int64_t e = 0; e < n * D; ++e) {
      const T diff = h[e] - targets[e];
      total += diff * diff;
      gy[e] = diff * scale;
    }
    if (rh) {
      for (int64_t e = 0; e < n * D; ++e) rgy[e] = rh[e] * scale;
    }
    total /= static_cast<T>(n * D);
  }

  int which = 0;
  for (size_t l = depth; l-- > 0;) {
    const auto& L = layers[l];
    const bool need_input_grad = l > 0;
    T* gx = tape.grads && l > 0 ? tape.grads + offsets[l - 1] : ws.g[1 - which];
    T* rgx = ws.rg[1 - which];
    const T* xin = inputs[l];
    const T* rxin = input_tangents[l];
    if (L.linear) {
      const T* w = theta + L.weight_offset;
      if (grad) {
        weight_gradient(gy, xin, grad + L.weight_offset, L.bias ? grad + L.bias_offset : nullptr,
                        n, L.in, L.out, false);
      }
      if (v) {
        // R{gW} = R{gy}ᵀ x + gyᵀ R{x};  R{gb} = Σ R{gy}
        weight_gradient(rgy, xin, hv + L.weight_offset, L.bias ? hv + L.bias_offset : nullptr, n,
                        L.in, L.out, false);
        if (rxin) {
          weight_gradient(gy, rxin, hv + L.weight_offset, static_cast<T*>(nullptr), n, L.in,
                          L.out, true);
        }
      }
      if (need_input_grad) {
        if (!replay) times_weight(gy, w, gx, n, L.in, L.out, false);
        if (v) {
          // R{gx} = R{gy} W + gy V
          times_weight(rgy, w, rgx, n, L.in, L.out, false);
          times_weight(gy, v + L.weight_offset, rgx, n, L.in, L.out, true);
        }
      }
    } else if (need_input_grad) {
      const int64_t size = n * L.out;
      if (!replay) {
        for (int64_t e = 0; e < size; ++e) gx[e] = xin[e] > T(0) ? gy[e] : T(0);
      }
      if (v) {
        for (int64_t e = 0; e < size; ++e) rgx[e] = xin[e] > T(0) ? rgy[e] : T(0);
      }
    }
    gy = gx;
    rgy = rgx;
    which = 1 - which;
  }
  return total;
}

// Task t's whole meta-step: the inner loop, the query pass, the reverse sweep.
template <typename T>
void run_task(const Problem<T>& pb, Workspace<T>& ws, int64_t t) {
  const int64_t P = pb.params, K = pb.steps, F = pb.input_width;
  const int64_t D = pb.mlp->output_width;
  const T* sx = pb.support_x + t * pb.support_n * F;
  const T* qx = pb.query_x + t * pb.query_n * F;
  const int64_t* sl = pb.support_labels ? pb.support_labels + t * pb.support_n : nullptr;
  const int64_t* ql = pb.query_labels ? pb.query_labels + t * pb.query_n : nullptr;
  const T* st = pb.support_targets ? pb.support_targets + t * pb.support_n * D : nullptr;
  const T* qt = pb.query_targets ? pb.query_targets + t * pb.query_n * D : nullptr;
  auto theta_at = [&](int64_t k) { return k == 0 ? pb.theta : ws.adapted + (k - 1) * P; };

  for (int64_t k = 0; k < K; ++k) {
    T* g = ws.grads + k * P;
    const TapeUse<T> record{ws.tape_outputs + k * ws.tape_stride,
                            ws.tape_grads + k * ws.tape_stride, false};
    const T loss = pass(pb, ws, theta_at(k), static_cast<const T*>(nullptr), sx, pb.support_n, sl,
                        st, g, static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                        pb.first_order ? TapeUse<T>{} : record);
    if (k == 0) pb.support_loss[t] = loss;
    // θ_{k+1} = θ_k − α_k ⊙ g_k
    const T* theta = theta_at(k);
    const T* alpha = pb.alpha + k * P;
    T* next = ws.adapted + k * P;
    for (int64_t j = 0; j < P; ++j) next[j] = theta[j] - alpha[j] * g[j];
  }

  T* lambda = pb.lambda + t * P;
  pb.query_loss[t] = pass(pb, ws, theta_at(K), static_cast<const T*>(nullptr), qx, pb.query_n, ql,
                          qt, lambda, static_cast<T*>(nullptr),
                          pb.query_accuracy ? pb.query_accuracy + t : nullptr);

  for (int64_t k = K - 1; k >= 0; --k) {
    const T* g = ws.grads + k * P;
    if (pb.rate_products) {
      T* product = pb.rate_products + (t * K + k) * P;
      for (int64_t j = 0; j < P; ++j) product[j] = lambda[j] * g[j];
    }
    if (!pb.first_order) {
      // λ_k = λ_{k+1} − H_S(θ_k)(α_k ⊙ λ_{k+1}); the primal pass at θ_k is on the tape.
      const T* alpha = pb.alpha + k * P;
      for (int64_t j = 0; j < P; ++j) ws.direction[j] = alpha[j] * lambda[j];
      const TapeUse<T> replay{ws.tape_outputs + k * ws.tape_stride,
                              ws.tape_grads + k * ws.tape_stride, true};
      pass(pb, ws, theta_at(k), static_cast<const T*>(ws.direction), sx, pb.support_n, sl, st,
           static_cast<T*>(nullptr), ws.hessian_vector, static_cast<T*>(nullptr), replay);
      for (int64_t j = 0; j < P; ++j) lambda[j] -= ws.hessian_vector[j];
    }
  }
}

template <typename T>
void run_tasks(const Problem<T>& pb, Workspace<T>& ws, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(pb, ws, t);
}

template <typename T>
Workspace<T>& thread_workspace() {
  thread_local Workspace<T> workspace;
  return workspace;
}

void check_labels(const at::Tensor& y, int64_t classes, const char* name) {
  const auto [low, high] = at::aminmax(y);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  MAML_CHECK_ARG(lo >= 0 && hi < classes, name, "expected class indices in [0, ", classes,
                 "), got values in [", lo, ", ", hi, "]");
}

}  // namespace

namespace {

// The program as an MLP the path takes (see mlp_meta_step_applies), or false.
bool parse_applicable(const at::Tensor& theta, const at::Tensor& support_x,
                      const at::Tensor& query_x, at::IntArrayRef program, Mlp& mlp) {
  if (!theta.device().is_cpu() || support_x.dim() != 3 || query_x.dim() != 3) return false;
  if (support_x.size(2) != query_x.size(2)) return false;
  if (!parse_mlp(program, support_x.size(2), mlp)) return false;
  return mlp.max_width <= kMaxWidth && mlp.layers.size() <= 64;
}

}  // namespace

bool mlp_meta_step_applies(const at::Tensor& theta, const at::Tensor& support_x,
                           const at::Tensor& query_x, at::IntArrayRef program) {
  Mlp mlp;
  return parse_applicable(theta, support_x, query_x, program, mlp);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order,
    bool inner_lr_grad) {
  const int64_t tasks =
      check_meta_step_args(theta, inner_lr, support_x, support_y, query_x, query_y, loss);
  Mlp mlp;
  MAML_CHECK_ARG(parse_applicable(theta, support_x, query_x, program, mlp), "program",
                 "the MLP path takes CPU tensors, inputs [T, N, features] and Linear/ReLU layers "
                 "at most ", kMaxWidth, " wide");
  // Validates the slices (they tile [0, P)) and the loss code, as the general path does.
  const Program validated(program, program_floats, loss, theta.size(0));
  const auto kind = validated.loss();
  if (kind == LossKind::kCrossEntropy) {
    check_labels(support_y, mlp.output_width, "support_y");
    check_labels(query_y, mlp.output_width, "query_y");
  } else {
    for (const auto& [y, name] : {std::pair{&support_y, "support_y"}, {&query_y, "query_y"}}) {
      MAML_CHECK_ARG(y->dim() == 3 && y->size(2) == mlp.output_width, name,
                     "expected targets shaped like the outputs [T, N, ", mlp.output_width,
                     "], got ", y->sizes());
    }
  }

  const int64_t P = theta.size(0), K = inner_lr.size(0);
  const auto options = theta.options();
  auto query_loss = at::empty({tasks}, options);
  auto accuracy = at::empty({kind == LossKind::kCrossEntropy ? tasks : 0}, options);
  auto support_loss = at::empty({tasks}, options);
  auto lambda = at::empty({tasks, P}, options);
  auto rate_products = inner_lr_grad ? at::empty({tasks, K, P}, options) : at::Tensor();
  const auto th = theta.contiguous(), alpha = inner_lr.contiguous();
  const auto sx = support_x.contiguous(), qx = query_x.contiguous();
  const auto sy = support_y.contiguous(), qy = query_y.contiguous();

  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "mlp_meta_step", [&] {
    using T = scalar_t;
    Problem<T> pb{};
    pb.mlp = &mlp;
    pb.loss = kind;
    pb.params = P;
    pb.steps = K;
    pb.input_width = sx.size(2);
    pb.support_n = sx.size(1);
    pb.query_n = qx.size(1);
    pb.first_order = first_order;
    pb.theta = th.data_ptr<T>();
    pb.alpha = alpha.data_ptr<T>();
    pb.support_x = sx.data_ptr<T>();
    pb.query_x = qx.data_ptr<T>();
    if (kind == LossKind::kCrossEntropy) {
      pb.support_labels = sy.data_ptr<int64_t>();
      pb.query_labels = qy.data_ptr<int64_t>();
    } else {
      pb.support_targets = sy.data_ptr<T>();
      pb.query_targets = qy.data_ptr<T>();
    }
    pb.query_loss = query_loss.data_ptr<T>();
    pb.query_accuracy = accuracy.numel() ? accuracy.data_ptr<T>() : nullptr;
    pb.support_loss = support_loss.data_ptr<T>();
    pb.lambda = lambda.data_ptr<T>();
    pb.rate_products = inner_lr_grad ? rate_products.data_ptr<T>() : nullptr;

    // Split tasks across threads only when each share is worth a thread hand-off (~tens of µs):
    // multiply-adds per task, counting a Hessian-vector pass as about three gradient passes.
    int64_t macs_per_sample = 0;
    for (const auto& layer : mlp.layers) macs_per_sample += layer.linear ? layer.in * layer.out : 0;
    const int64_t passes = K * (first_order ? 1 : 4);
    const int64_t task_macs = macs_per_sample * 3 * (pb.support_n * passes + pb.query_n);
    constexpr int64_t kMacsPerThread = 1 << 20;
    const int64_t grain = std::max<int64_t>(1, kMacsPerThread / std::max<int64_t>(task_macs, 1));
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      auto& ws = thread_workspace<T>();
      ws.prepare(pb);
      run_tasks(pb, ws, begin, end);
    });
  });

  // The task means, in a fixed order (deterministic whatever the thread count).
  auto meta_grad = lambda.mean(0);
  auto rate_grad = inner_lr_grad ? rate_products.sum(0).mul_(-1.0 / static_cast<double>(tasks))
                                 : at::empty({0}, options);
  return {query_loss, accuracy, support_loss, meta_grad, rate_grad};
}

}  // namespace cpu
}  // namespace maml_ext
