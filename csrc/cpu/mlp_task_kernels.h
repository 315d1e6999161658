// The per-task kernels of the MLP meta-step (mlp_meta_step.cpp): register-blocked matrix
// products, transposes and the forward/backward/tangent passes of one task. No include guard and
// no includes: mlp_meta_step.cpp includes this file twice, once under
// `#pragma GCC target("avx2,fma")` and once without, each time inside its own namespace, so the
// whole task loop (products and the element-wise loops between them) exists for AVX2 + FMA and
// for baseline x86-64 and the op picks one at run time. It uses the types declared before the
// include there (Mlp, Problem, Workspace, TapeUse, Float8/Double4).

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

// Every lane x: x − 0 is x exactly (even for −0), so this folds to a bare broadcast; Vec{} + x
// does not (−0 + 0 is +0) and costs an addition in front of each broadcast.
template <typename T>
MAML_INLINE typename Simd<T>::Vec broadcast(T x) {
  return x - typename Simd<T>::Vec{};
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
    // R broadcasts, then B's row one vector at a time: R × V sums + R + 1 registers.
    Vec scale[R];
    for (int r = 0; r < R; ++r) scale[r] = broadcast<T>(a[r * lda + k * a_step]);
    for (int v = 0; v < V; ++v) {
      Vec row = load(b + k * ldb + v * L);
#ifdef __AVX__
      // Keeps the vector in a register: GCC otherwise folds the load into each of the R FMAs,
      // and R loads per vector of B made the products load-bound (2 × 5 blocks: 1236 → 729
      // cycles for a 40 × 10 × 40 weight gradient, 913 → 746 for a 10 × 40 × 40 product).
      __asm__("" : "+x"(row));
#endif
      for (int r = 0; r < R; ++r) sums[r][v] += scale[r] * row;
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

// Blocks of R rows × 5 vectors (40 floats: the sinusoid net's width), then one block of the
// remaining whole vectors, then single columns. With R = 2 a block keeps 10 independent sums in
// flight, enough to cover the FMA latency (4 × 8 blocks left the 40-wide products' last 8 columns
// and last 2 rows at half or a quarter of the speed), in 16 vector registers.
template <int R, typename T>
MAML_INLINE void gemm_rows(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c,
                           int64_t ldc, int64_t cols, int64_t depth, bool accumulate) {
  constexpr int L = kLanes<T>;
  int64_t col = 0;
  for (; col + 5 * L <= cols; col += 5 * L) {
    gemm_block<R, 5>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate);
  }
  const int64_t vectors = (cols - col) / L;
  switch (vectors) {
    case 4: gemm_block<R, 4>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate); break;
    case 3: gemm_block<R, 3>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate); break;
    case 2: gemm_block<R, 2>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate); break;
    case 1: gemm_block<R, 1>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate); break;
    default: break;
  }
  col += vectors * L;
  for (; col < cols; ++col) {
    gemm_column<R>(a, lda, a_step, b + col, ldb, c + col, ldc, depth, accumulate);
  }
}

// c[r * ldc] (+)= Σ_k a[r * lda + k] b[k]: a matrix-vector product with contiguous rows, summed
// in vectors along k (a layer with one output: the column path would run one scalar chain per row).
template <typename T>
MAML_INLINE void gemv_rows(const T* __restrict__ a, int64_t lda, const T* __restrict__ b,
                           T* __restrict__ c, int64_t ldc, int64_t rows, int64_t depth,
                           bool accumulate) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = kLanes<T>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * lda;
    Vec acc{};
    int64_t k = 0;
    for (; k + L <= depth; k += L) acc += load(row + k) * load(b + k);
    T sum = accumulate ? c[r * ldc] : T(0);
    for (int i = 0; i < L; ++i) sum += acc[i];
    for (; k < depth; ++k) sum += row[k] * b[k];
    c[r * ldc] = sum;
  }
}

// C[rows, cols] (+)= A[rows, depth] B[depth, cols], A strided as in gemm_block, B and C row-major.
template <typename T>
MAML_INLINE void gemm_kernel(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c,
                             int64_t ldc, int64_t rows, int64_t cols, int64_t depth,
                             bool accumulate) {
  if (cols == 1 && a_step == 1 && ldb == 1) {
    return gemv_rows(a, lda, b, c, ldc, rows, depth, accumulate);
  }
  if (cols == 1 && rows > 1 && lda == 1 && ldc == 1) {
    // One column of a product with A given transposed (a weight gradient with one input): as
    // the row Cᵀ = Bᵀ Aᵀ, whose columns are vectors.
    return gemm_rows<1>(b, 0, ldb, a, a_step, c, 0, rows, depth, accumulate);
  }
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    gemm_rows<2>(a + r * lda, lda, a_step, b, ldb, c + r * ldc, ldc, cols, depth, accumulate);
  }
  if (r < rows) {
    gemm_rows<1>(a + r * lda, lda, a_step, b, ldb, c + r * ldc, ldc, cols, depth, accumulate);
  }
}

// One instance per T and instruction set, called from everywhere: the register blocks are
// inlined into it, not into each caller (code size, instruction cache).
template <typename T>
MAML_NOINLINE void gemm(const T* a, int64_t lda, int64_t a_step, const T* b, int64_t ldb, T* c,
                        int64_t ldc, int64_t rows, int64_t cols, int64_t depth, bool accumulate) {
  gemm_kernel(a, lda, a_step, b, ldb, c, ldc, rows, cols, depth, accumulate);
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

// dst rows i = src columns i for one square block of kLanes × kLanes (vector shuffles: unpack
// pairs of rows, then pairs of pairs, then halves).
MAML_INLINE void transpose_block(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  Float8 r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = load(src + i * src_ld);
  for (int i = 0; i < 8; i += 2) {
    a[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 8; h += 4) {
    b[h] = __builtin_shufflevector(a[h], a[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    b[h + 1] = __builtin_shufflevector(a[h], a[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    b[h + 2] = __builtin_shufflevector(a[h + 1], a[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    b[h + 3] = __builtin_shufflevector(a[h + 1], a[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {
    store(dst + c * dst_ld, __builtin_shufflevector(b[c], b[c + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store(dst + (c + 4) * dst_ld,
          __builtin_shufflevector(b[c], b[c + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

MAML_INLINE void transpose_block(const double* src, int64_t src_ld, double* dst, int64_t dst_ld) {
  Double4 r[4];
  for (int i = 0; i < 4; ++i) r[i] = load(src + i * src_ld);
  const Double4 a0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6);
  const Double4 a1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
  const Double4 a2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6);
  const Double4 a3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
  store(dst, __builtin_shufflevector(a0, a2, 0, 1, 4, 5));
  store(dst + dst_ld, __builtin_shufflevector(a1, a3, 0, 1, 4, 5));
  store(dst + 2 * dst_ld, __builtin_shufflevector(a0, a2, 2, 3, 6, 7));
  store(dst + 3 * dst_ld, __builtin_shufflevector(a1, a3, 2, 3, 6, 7));
}

// wt[in, out] = w[out, in]ᵀ: whole blocks by shuffles, the edges element by element. (Element
// by element throughout, the 40 × 40 weight's strided stores were a fifth of the sinusoid step.)
template <typename T>
void transpose(const T* __restrict__ w, T* __restrict__ wt, int64_t out, int64_t in) {
  constexpr int L = kLanes<T>;
  int64_t o0 = 0;
  for (; o0 + L <= out; o0 += L) {
    int64_t i0 = 0;
    for (; i0 + L <= in; i0 += L) transpose_block(w + o0 * in + i0, in, wt + i0 * out + o0, out);
    for (int64_t i = i0; i < in; ++i) {
      for (int64_t o = o0; o < o0 + L; ++o) wt[i * out + o] = w[o * in + i];
    }
  }
  for (int64_t o = o0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) wt[i * out + o] = w[o * in + i];
  }
}

// θ with every Linear weight [out, in] replaced by its transpose [in, out] (biases untouched:
// the passes read them from θ).
template <typename T>
void transpose_weights(const Mlp& mlp, const T* theta, T* theta_t) {
  for (const auto& layer : mlp.layers) {
    if (layer.linear) {
      transpose(theta + layer.weight_offset, theta_t + layer.weight_offset, layer.out, layer.in);
    }
  }
}

// One forward + backward at weights theta on (x, labels | targets) of n samples: writes the
// gradient to grad (if given) and, carrying the tangent v, H v to hv. Returns the mean loss.
// theta_t: theta's weights transposed (transpose_weights), or null to transpose them here.
template <typename T>
T pass(const Problem<T>& pb, Workspace<T>& ws, const T* theta, const T* theta_t, const T* v,
       const T* x, int64_t n,
       const int64_t* labels, const T* targets, T* grad, T* hv, T* accuracy,
       TapeUse<T> tape = {}) {
  const auto& layers = pb.mlp->layers;
  const size_t depth = layers.size();
  // Inputs of each layer and their tangents (null: zero tangent), kept for the backward pass.
  const T* inputs[64];
  const T* input_tangents[64];
  const T* wt = theta_t;
  if (!wt) {
    transpose_weights(*pb.mlp, theta, ws.wt);
    wt = ws.wt;
  }
  if (v) transpose_weights(*pb.mlp, v, ws.vt);
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
        times_transposed(h, wt + L.weight_offset, L.bias ? theta + L.bias_offset : nullptr,
                         act, n, L.in, L.out, false);
      }
      if (v) {
        // R{y} = x Vᵀ + v_b + R{x} Wᵀ
        times_transposed(h, ws.vt + L.weight_offset, L.bias ? v + L.bias_offset : nullptr, tan, n,
                         L.in, L.out, false);
        if (rh) {
          times_transposed(rh, wt + L.weight_offset, static_cast<const T*>(nullptr), tan, n,
                           L.in, L.out, true);
        }
        rh = tan;
      }
    } else {
      if (!replay) {
        for (int64_t e = 0; e < size; ++e) act[e] = h[e] > T(0) ? h[e] : T(0);
      }
      if (rh) {
        for (int64_t e = 0; e < size; ++e) {
          const T r = rh[e];
          tan[e] = h[e] > T(0) ? r : T(0);
        }
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
        for (int64_t e = 0; e < size; ++e) {
          const T g = gy[e];
          gx[e] = xin[e] > T(0) ? g : T(0);
        }
      }
      if (v) {
        for (int64_t e = 0; e < size; ++e) {
          const T r = rgy[e];
          rgx[e] = xin[e] > T(0) ? r : T(0);
        }
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
  const int64_t S = pb.param_stride;
  const int64_t P = pb.params, K = pb.steps, F = pb.input_width;
  const int64_t D = pb.mlp->output_width;
  const T* sx = pb.support_x + t * pb.support_n * F;
  const T* qx = pb.query_x + t * pb.query_n * F;
  const int64_t* sl = pb.support_labels ? pb.support_labels + t * pb.support_n : nullptr;
  const int64_t* ql = pb.query_labels ? pb.query_labels + t * pb.query_n : nullptr;
  const T* st = pb.support_targets ? pb.support_targets + t * pb.support_n * D : nullptr;
  const T* qt = pb.query_targets ? pb.query_targets + t * pb.query_n * D : nullptr;
  auto theta_at = [&](int64_t k) { return k == 0 ? pb.theta : ws.adapted + (k - 1) * S; };
  // θ₀'s transposed weights are shared by all tasks; the adapted ones are transposed per pass.
  auto transposed_at = [&](int64_t k) { return k == 0 ? pb.theta_transposed : nullptr; };

  for (int64_t k = 0; k < K; ++k) {
    T* g = ws.grads + k * S;
    const TapeUse<T> record{ws.tape_outputs + k * ws.tape_stride,
                            ws.tape_grads + k * ws.tape_stride, false};
    const T loss = pass(pb, ws, theta_at(k), transposed_at(k), static_cast<const T*>(nullptr), sx,
                        pb.support_n, sl,
                        st, g, static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                        pb.first_order ? TapeUse<T>{} : record);
    if (k == 0) pb.support_loss[t] = loss;
    // θ_{k+1} = θ_k − α_k ⊙ g_k
    const T* theta = theta_at(k);
    const T* alpha = pb.alpha + k * P;
    T* next = ws.adapted + k * S;
    for (int64_t j = 0; j < P; ++j) next[j] = theta[j] - alpha[j] * g[j];
  }

  T* lambda = pb.lambda + t * S;
  pb.query_loss[t] = pass(pb, ws, theta_at(K), transposed_at(K), static_cast<const T*>(nullptr),
                          qx, pb.query_n, ql,
                          qt, lambda, static_cast<T*>(nullptr),
                          pb.query_accuracy ? pb.query_accuracy + t : nullptr);

  for (int64_t k = K - 1; k >= 0; --k) {
    const T* g = ws.grads + k * S;
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
      pass(pb, ws, theta_at(k), transposed_at(k), static_cast<const T*>(ws.direction), sx,
           pb.support_n, sl, st,
           static_cast<T*>(nullptr), ws.hessian_vector, static_cast<T*>(nullptr), replay);
      for (int64_t j = 0; j < P; ++j) lambda[j] -= ws.hessian_vector[j];
    }
  }
}

template <typename T>
MAML_NOINLINE void run_tasks(const Problem<T>& pb, Workspace<T>& ws, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(pb, ws, t);
}

