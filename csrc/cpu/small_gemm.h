// Small dense kernels on row-major matrices, for the MLP path (mlp_task_kernels.h):
// register-blocked matrix products C = start + A B (+ A₂ B₂) and transposes, on explicit 32-byte
// vectors (GCC vector extensions).
//
// Compiled once per instruction set (for_each_isa.h): no include guard, no includes. Include it
// from a kernel header compiled that way, inside the ISA namespace, after <algorithm>, <cstdint>,
// <cstring> and vector_isa.h (MAML_INLINE, MAML_NOINLINE).

// One 32-byte vector of T: one AVX register in the AVX2 version, two SSE halves in the baseline
// one.
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
        // Keeps the vector in a register: GCC otherwise folds the load into each of the R
        // multiply-adds, and R loads per vector of B make the products load-bound.
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
    case 4:
      gemm_block<R, 4>(p, row, col);
      break;
    case 3:
      gemm_block<R, 3>(p, row, col);
      break;
    case 2:
      gemm_block<R, 2>(p, row, col);
      break;
    case 1:
      gemm_block<R, 1>(p, row, col);
      break;
    default:
      break;
  }
  for (col += vectors * L; col < p.cols; ++col) gemm_column<R>(p, row, col);
}

// 4 rows: blocks of 2 vectors, then 1, then single columns. Each vector of B serves 4 rows, so
// a 10-row product reads B in 3 sweeps, not 5: fewer passes over B beat the wider 2 × 5 blocks
// in the MLP pass, whose per-task data overflow L1 (bench/NOTES.md).
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
  return {{o.a, o.a2}, {o.b, o.b2}, o.a2 ? 2 : 1, lda,   a_step,     ldb,      c,
          ldc,         rows,        cols,         depth, accumulate, start_row};
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

// wt[in, out] = w[out, in]ᵀ: whole blocks by shuffles (element by element, the strided stores
// are slow), the edges element by element.
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
