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

// C[rows, cols] = start + A₁ B₁ (+ A₂ B₂): one or two products of the same shape into the same
// sums (the Hessian-vector pass's tangent rules come in such pairs, e.g. R{y} = x Vᵀ + R{x} Wᵀ;
// summing both in registers writes C once instead of storing and reloading it). A's element
// (r, k) is a[r * lda + k * a_step] (A given transposed: lda = 1); B and C are row-major. The
// start is C's own values (accumulate), else the row start_row[cols] in every row (a bias), else 0.
template <typename T>
struct Product {
  const T* a[2];
  const T* b[2];
  int terms;  // 1 or 2
  int64_t lda, a_step, ldb;
  T* c;
  int64_t ldc, rows, cols, depth;
  bool accumulate;
  const T* start_row;  // or null
};

// The block of R rows × V vectors of C at (row, col): the R × V vector sums stay in registers
// across k, so each step loads V vectors of B's row once for R rows of A.
template <int R, int V, typename T>
MAML_INLINE void gemm_block(const Product<T>& p, int64_t row, int64_t col) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = kLanes<T>;
  T* __restrict__ c = p.c + row * p.ldc + col;
  Vec sums[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      sums[r][v] = p.accumulate  ? load(c + r * p.ldc + v * L)
                   : p.start_row ? load(p.start_row + col + v * L)
                                 : Vec{};
    }
  }
  for (int term = 0; term < p.terms; ++term) {
    const T* __restrict__ a = p.a[term] + row * p.lda;
    const T* __restrict__ b = p.b[term] + col;
    for (int64_t k = 0; k < p.depth; ++k) {
      // R broadcasts, then B's row one vector at a time: R × V sums + R + 1 registers.
      Vec scale[R];
      for (int r = 0; r < R; ++r) scale[r] = broadcast<T>(a[r * p.lda + k * p.a_step]);
      for (int v = 0; v < V; ++v) {
        Vec b_row = load(b + k * p.ldb + v * L);
#ifdef __AVX__
        // Keeps the vector in a register: GCC otherwise folds the load into each of the R FMAs,
        // and R loads per vector of B made the products load-bound (2 × 5 blocks: 1236 → 729
        // cycles for a 40 × 10 × 40 weight gradient, 913 → 746 for a 10 × 40 × 40 product).
        __asm__("" : "+x"(b_row));
#endif
        for (int r = 0; r < R; ++r) sums[r][v] += scale[r] * b_row;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) store(c + r * p.ldc + v * L, sums[r][v]);
  }
}

// The same for one column (the remainder after whole vectors).
template <int R, typename T>
MAML_INLINE void gemm_column(const Product<T>& p, int64_t row, int64_t col) {
  T* c = p.c + row * p.ldc + col;
  T sums[R];
  for (int r = 0; r < R; ++r) {
    sums[r] = p.accumulate ? c[r * p.ldc] : p.start_row ? p.start_row[col] : T(0);
  }
  for (int term = 0; term < p.terms; ++term) {
    const T* a = p.a[term] + row * p.lda;
    const T* b = p.b[term] + col;
    for (int64_t k = 0; k < p.depth; ++k) {
      for (int r = 0; r < R; ++r) sums[r] += a[r * p.lda + k * p.a_step] * b[k * p.ldb];
    }
  }
  for (int r = 0; r < R; ++r) c[r * p.ldc] = sums[r];
}

// R (1 or 2) rows: blocks of 5 vectors (40 floats: the sinusoid net's width), then one block of
// the remaining whole vectors, then single columns. A 2 × 5 block keeps 10 independent sums in
// flight, enough to cover the FMA latency, in 16 vector registers.
template <int R, typename T>
MAML_INLINE void gemm_rows(const Product<T>& p, int64_t row) {
  constexpr int L = kLanes<T>;
  int64_t col = 0;
  for (; col + 5 * L <= p.cols; col += 5 * L) gemm_block<R, 5>(p, row, col);
  const int64_t vectors = (p.cols - col) / L;
  switch (vectors) {
    case 4: gemm_block<R, 4>(p, row, col); break;
    case 3: gemm_block<R, 3>(p, row, col); break;
    case 2: gemm_block<R, 2>(p, row, col); break;
    case 1: gemm_block<R, 1>(p, row, col); break;
    default: break;
  }
  for (col += vectors * L; col < p.cols; ++col) gemm_column<R>(p, row, col);
}

// 4 rows: blocks of 2 vectors, then 1, then single columns. Each vector of B serves 4 rows, so
// a 10-row product reads B in 3 sweeps, not 5 (measured in the op, sinusoid: 434k → 401k cycles
// per call against 2 × 5 blocks throughout, which are faster on data already in L1).
template <typename T>
MAML_INLINE void gemm_four_rows(const Product<T>& p, int64_t row) {
  constexpr int L = kLanes<T>;
  int64_t col = 0;
  for (; col + 2 * L <= p.cols; col += 2 * L) gemm_block<4, 2>(p, row, col);
  for (; col + L <= p.cols; col += L) gemm_block<4, 1>(p, row, col);
  for (; col < p.cols; ++col) gemm_column<4>(p, row, col);
}

// One output column with contiguous rows of A and a contiguous B (a layer with one output):
// dot products summed in vectors along k, where the column path would run one scalar chain per
// row.
template <typename T>
MAML_INLINE void gemv_rows(const Product<T>& p) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = kLanes<T>;
  for (int64_t r = 0; r < p.rows; ++r) {
    Vec acc{};
    T sum = p.accumulate ? p.c[r * p.ldc] : p.start_row ? p.start_row[0] : T(0);
    for (int term = 0; term < p.terms; ++term) {
      const T* a = p.a[term] + r * p.lda;
      const T* b = p.b[term];
      int64_t k = 0;
      for (; k + L <= p.depth; k += L) acc += load(a + k) * load(b + k);
      for (; k < p.depth; ++k) sum += a[k] * b[k];
    }
    for (int i = 0; i < L; ++i) sum += acc[i];
    p.c[r * p.ldc] = sum;
  }
}

template <typename T>
MAML_INLINE void gemm_kernel(const Product<T>& p) {
  if (p.cols == 1 && p.a_step == 1 && p.ldb == 1) return gemv_rows(p);
  if (p.cols == 1 && p.rows > 1 && p.lda == 1 && p.ldc == 1 && !p.start_row) {
    // One column of a product with A given transposed (a weight gradient with one input): as
    // the row Cᵀ = Bᵀ Aᵀ, whose columns are vectors.
    Product<T> row = p;
    row.a[0] = p.b[0], row.a[1] = p.b[1], row.b[0] = p.a[0], row.b[1] = p.a[1];
    row.lda = 0, row.a_step = p.ldb, row.ldb = p.a_step, row.ldc = 0;
    row.rows = 1, row.cols = p.rows;
    return gemm_rows<1>(row, 0);
  }
  int64_t r = 0;
  for (; r + 4 <= p.rows; r += 4) gemm_four_rows(p, r);
  for (; r + 2 <= p.rows; r += 2) gemm_rows<2>(p, r);
  if (r < p.rows) gemm_rows<1>(p, r);
}

// One instance per T and instruction set, called from everywhere: the register blocks are
// inlined into it, not into each caller (code size, instruction cache).
template <typename T>
MAML_NOINLINE void gemm(const Product<T>& p) {
  gemm_kernel(p);
}

// The operand pairs of one product or a sum of two (second pair: null, or both given).
template <typename T>
struct Operands {
  const T* a;
  const T* b;
  const T* a2 = nullptr;
  const T* b2 = nullptr;
};

template <typename T>
Product<T> product(const Operands<T>& o, int64_t lda, int64_t a_step, int64_t ldb, T* c,
                   int64_t ldc, int64_t rows, int64_t cols, int64_t depth, bool accumulate,
                   const T* start_row) {
  return {{o.a, o.a2}, {o.b, o.b2}, o.a2 ? 2 : 1, lda, a_step, ldb, c, ldc, rows, cols, depth,
          accumulate, start_row};
}

// y[n, out] = x[n, in] · Wᵀ (+ x₂ · W₂ᵀ) + bias, with each Wᵀ given as wt[in, out]:
// operands {x, wt[, x₂, wt₂]}.
template <typename T>
void times_transposed(const Operands<T>& o, const T* bias, T* y, int64_t n, int64_t in,
                      int64_t out) {
  gemm(product(o, in, 1, out, y, out, n, out, in, false, bias));
}

// gx[n, in] = gy[n, out] · W (+ gy₂ · W₂), W given as w[out, in]: operands {gy, w[, gy₂, w₂]}.
template <typename T>
void times_weight(const Operands<T>& o, T* gx, int64_t n, int64_t in, int64_t out) {
  gemm(product(o, out, 1, in, gx, in, n, in, out, false, static_cast<const T*>(nullptr)));
}

// gw[out, in] (+)= gy[n, out]ᵀ · x[n, in] (+ gy₂ᵀ x₂): operands {gy, x[, gy₂, x₂]};
// gb[out] (+)= Σ_n gy (the first term's only: a bias's input is the constant 1, without tangent).
template <typename T>
void weight_gradient(const Operands<T>& o, T* gw, T* gb, int64_t n, int64_t in, int64_t out,
                     bool accumulate) {
  gemm(product(o, 1, out, in, gw, in, out, in, n, accumulate, static_cast<const T*>(nullptr)));
  if (gb) {
    if (!accumulate) std::fill(gb, gb + out, T(0));
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t o_ = 0; o_ < out; ++o_) gb[o_] += o.a[r * out + o_];
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

// out[e] = values[e] where the ReLU's input x[e] > 0, else 0: its derivative applied to values
// (a tangent forward, a gradient or its tangent backward). values is read unconditionally, so the
// loop is a vector blend, not a branch per element.
template <typename T>
void relu_masked(const T* x, const T* values, T* out, int64_t size) {
  for (int64_t e = 0; e < size; ++e) {
    const T value = values[e];
    out[e] = x[e] > T(0) ? value : T(0);
  }
}

// One forward + backward at weights theta on (x, labels | targets) of n samples: writes the
// gradient to grad (if given) and, carrying the tangent v, adds H v to hv. Returns the mean loss.
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
        times_transposed<T>({h, wt + L.weight_offset}, L.bias ? theta + L.bias_offset : nullptr,
                            act, n, L.in, L.out);
      }
      if (v) {
        // R{y} = x Vᵀ + v_b + R{x} Wᵀ
        Operands<T> terms{h, ws.vt + L.weight_offset};
        if (rh) terms.a2 = rh, terms.b2 = wt + L.weight_offset;
        times_transposed(terms, L.bias ? v + L.bias_offset : nullptr, tan, n, L.in, L.out);
        rh = tan;
      }
    } else {
      if (!replay) {
        for (int64_t e = 0; e < size; ++e) act[e] = h[e] > T(0) ? h[e] : T(0);
      }
      if (rh) {
        relu_masked(h, rh, tan, size);
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
        weight_gradient<T>({gy, xin}, grad + L.weight_offset,
                           L.bias ? grad + L.bias_offset : nullptr, n, L.in, L.out, false);
      }
      if (v) {
        // R{gW} = R{gy}ᵀ x + gyᵀ R{x};  R{gb} = Σ R{gy}
        Operands<T> terms{rgy, xin};
        if (rxin) terms.a2 = gy, terms.b2 = rxin;
        weight_gradient(terms, hv + L.weight_offset, L.bias ? hv + L.bias_offset : nullptr, n,
                        L.in, L.out, true);
      }
      if (need_input_grad) {
        if (!replay) times_weight<T>({gy, w}, gx, n, L.in, L.out);
        if (v) {
          // R{gx} = R{gy} W + gy V
          times_weight<T>({rgy, w, gy, v + L.weight_offset}, rgx, n, L.in, L.out);
        }
      }
    } else if (need_input_grad) {
      const int64_t size = n * L.out;
      if (!replay) relu_masked(xin, gy, gx, size);
      if (v) relu_masked(xin, rgy, rgx, size);
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
      // λ_k = λ_{k+1} − H_S(θ_k)(α_k ⊙ λ_{k+1}) = λ_{k+1} + H_S(θ_k)(−α_k ⊙ λ_{k+1}): the
      // pass adds H v into λ as it goes (negating v is exact), with no H v buffer and no
      // subtraction pass. The primal pass at θ_k is on the tape.
      const T* alpha = pb.alpha + k * P;
      for (int64_t j = 0; j < P; ++j) ws.direction[j] = -alpha[j] * lambda[j];
      const TapeUse<T> replay{ws.tape_outputs + k * ws.tape_stride,
                              ws.tape_grads + k * ws.tape_stride, true};
      pass(pb, ws, theta_at(k), transposed_at(k), static_cast<const T*>(ws.direction), sx,
           pb.support_n, sl, st, static_cast<T*>(nullptr), lambda, static_cast<T*>(nullptr),
           replay);
    }
  }
}

template <typename T>
MAML_NOINLINE void run_tasks(const Problem<T>& pb, Workspace<T>& ws, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(pb, ws, t);
}

