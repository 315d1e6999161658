// The body of the task-batched implicit-product kernel (cuda/task_conv_cuda.cu), as three phases
// that one thread runs: stage its share of a k-tile into shared memory, accumulate the staged
// tile into its outputs, store them. The CUDA kernel runs the phases with __syncthreads() between
// them; the CPU emulation (cpu/task_conv_emulation.cpp) runs each phase for every thread of a
// block in turn, so the CPU tests execute the kernel's own code.
//
// The fused tangent: out = A·B and out_tangent = A·RB + RA·B accumulate together from the same
// staged tiles, so each tile of A (x or gy) and of B (weights or x) is read once for both.
//
// The forward may add an epilogue of two more phases: the batch-norm partial statistics of the
// block's outputs (see stage_column_statistics), so a following batch norm need not re-read them.
#pragma once

#include <cstdint>
#include <type_traits>

#include "batch_norm_partials.h"
#include "conv_tiling.h"
#include "task_conv_math.h"

// Unrolled in the kernel (the accumulators must stay in registers); a plain loop on the host.
#if defined(__CUDACC__)
#define MAML_UNROLL _Pragma("unroll")
#else
#define MAML_UNROLL
#endif

namespace maml_ext {
namespace kernels {

constexpr int kTileThreads = static_cast<int>(kGemmThreadsPerDim);  // per block dimension
constexpr int kTileMaxPerThread = 4;                                // outputs_per_thread() <= 4
constexpr int kTileMax = kTileThreads * kTileMaxPerThread;          // 64
constexpr int kTileK = static_cast<int>(kGemmBlockK);

// Shared memory of one block. +1 on A: its reduction-fastest staging writes down a column, and the
// padding spreads those writes over banks.
template <typename scalar_t, bool kTangent>
struct GemmTiles {
  scalar_t a[kTileK][kTileMax + 1];
  scalar_t b[kTileK][kTileMax];
  scalar_t a_tangent[kTangent ? kTileK : 1][kTileMax + 1];
  scalar_t b_tangent[kTangent ? kTileK : 1][kTileMax];
};

// Only the forward product (never split) can carry the statistics epilogue.
template <typename Problem>
constexpr bool kHasStatistics = std::is_same_v<Problem, ForwardGemm>;

// One thread's outputs (registers in the kernel); only thread_m x thread_n of them are used.
template <typename scalar_t>
struct ThreadAccumulators {
  scalar_t out[kTileMaxPerThread][kTileMaxPerThread];
  scalar_t tangent[kTileMaxPerThread][kTileMaxPerThread];
};

// What a block works on: grid (x, y, z) = (row tile, column tile, task · splits + split).
struct GemmBlock {
  int64_t task, split, block_m_index, block_n_index, k_begin, k_end;
  int64_t row0, col0;
};

MAML_HOST_DEVICE GemmBlock gemm_block(const GemmTiling& t, int64_t x, int64_t y, int64_t z) {
  GemmBlock b;
  b.task = z / t.splits;
  b.split = z % t.splits;
  b.block_m_index = x;
  b.block_n_index = y;
  split_range(t, b.split, &b.k_begin, &b.k_end);
  b.row0 = x * t.block_m;
  b.col0 = y * t.block_n;
  return b;
}

// The operands of one task; tangent pointers null where absent or not computed (zero).
template <typename scalar_t>
struct TaskOperands {
  const scalar_t* a;
  const scalar_t* a_tangent;
  const scalar_t* b;
  const scalar_t* b_tangent;
};

template <typename scalar_t, bool kTangent>
MAML_HOST_DEVICE TaskOperands<scalar_t> task_operands(const GemmOperands<scalar_t>& ops,
                                                      int64_t task) {
  TaskOperands<scalar_t> o;
  o.a = ops.a + task * ops.a_task_stride;
  o.b = ops.b + task * ops.b_task_stride;
  o.a_tangent =
      kTangent && ops.a_tangent ? ops.a_tangent + task * ops.a_tangent_task_stride : nullptr;
  o.b_tangent =
      kTangent && ops.b_tangent ? ops.b_tangent + task * ops.b_tangent_task_stride : nullptr;
  return o;
}

template <typename scalar_t>
MAML_HOST_DEVICE void zero_accumulators(ThreadAccumulators<scalar_t>& acc) {
  MAML_UNROLL
  for (int i = 0; i < kTileMaxPerThread; ++i) {
    MAML_UNROLL
    for (int j = 0; j < kTileMaxPerThread; ++j) {
      acc.out[i][j] = scalar_t(0);
      acc.tangent[i][j] = scalar_t(0);
    }
  }
}

// Phase 1: thread `tid` (of kTileThreads²) stages its share of the k-tile [k0, k0 + kTileK):
// A[row0 .. row0 + block_m) x [k0 ..) and B[k0 ..) x [col0 .. col0 + block_n), zero outside the
// product and the block's split. Neighbouring threads read neighbouring memory: the reduction
// index is fastest for A unless Problem::kARowFastest; the column is fastest for B.
template <typename scalar_t, typename Problem, bool kTangent>
MAML_HOST_DEVICE void stage_tiles(const Problem& problem, const TaskOperands<scalar_t>& o,
                                  const GemmTiling& t, const GemmBlock& blk, int64_t k0, int tid,
                                  GemmTiles<scalar_t, kTangent>& tiles) {
  const int block_m = static_cast<int>(t.block_m), block_n = static_cast<int>(t.block_n);
  for (int e = tid; e < block_m * kTileK; e += kTileThreads * kTileThreads) {
    int kk, mm;
    if constexpr (Problem::kARowFastest) {
      mm = e % block_m;
      kk = e / block_m;
    } else {
      kk = e % kTileK;
      mm = e / kTileK;
    }
    const int64_t row = blk.row0 + mm, red = k0 + kk;
    scalar_t value = scalar_t(0), tangent = scalar_t(0);
    if (row < t.rows && red < blk.k_end) {
      const int64_t offset = problem.a_offset(blk.task, row, red);
      if (offset >= 0) {
        value = o.a[offset];
        if (o.a_tangent != nullptr) tangent = o.a_tangent[offset];
      }
    }
    tiles.a[kk][mm] = value;
    if constexpr (kTangent) tiles.a_tangent[kk][mm] = tangent;
  }
  for (int e = tid; e < block_n * kTileK; e += kTileThreads * kTileThreads) {
    const int nn = e % block_n, kk = e / block_n;
    const int64_t col = blk.col0 + nn, red = k0 + kk;
    scalar_t value = scalar_t(0), tangent = scalar_t(0);
    if (col < t.cols && red < blk.k_end) {
      const int64_t offset = problem.b_offset(blk.task, red, col);
      if (offset >= 0) {
        value = o.b[offset];
        if (o.b_tangent != nullptr) tangent = o.b_tangent[offset];
      }
    }
    tiles.b[kk][nn] = value;
    if constexpr (kTangent) tiles.b_tangent[kk][nn] = tangent;
  }
}

// Phase 2: thread (ty, tx) adds the staged tile's products to its outputs: rows i·kTileThreads +
// ty, columns j·kTileThreads + tx of the tile (tile_element). The loops run to the compile-time
// maximum with guards, so the kernel's accumulators stay in registers.
template <typename scalar_t, bool kTangent>
MAML_HOST_DEVICE void accumulate_tile(const GemmTiles<scalar_t, kTangent>& tiles,
                                      const GemmTiling& t, int ty, int tx,
                                      ThreadAccumulators<scalar_t>& acc) {
  const int per_m = static_cast<int>(t.thread_m), per_n = static_cast<int>(t.thread_n);
  MAML_UNROLL
  for (int kk = 0; kk < kTileK; ++kk) {
    scalar_t a[kTileMaxPerThread], b[kTileMaxPerThread];
    [[maybe_unused]] scalar_t ra[kTileMaxPerThread], rb[kTileMaxPerThread];
    MAML_UNROLL
    for (int i = 0; i < kTileMaxPerThread; ++i) {
      a[i] = i < per_m ? tiles.a[kk][i * kTileThreads + ty] : scalar_t(0);
      if constexpr (kTangent)
        ra[i] = i < per_m ? tiles.a_tangent[kk][i * kTileThreads + ty] : scalar_t(0);
    }
    MAML_UNROLL
    for (int j = 0; j < kTileMaxPerThread; ++j) {
      b[j] = j < per_n ? tiles.b[kk][j * kTileThreads + tx] : scalar_t(0);
      if constexpr (kTangent)
        rb[j] = j < per_n ? tiles.b_tangent[kk][j * kTileThreads + tx] : scalar_t(0);
    }
    MAML_UNROLL
    for (int i = 0; i < kTileMaxPerThread; ++i) {
      MAML_UNROLL
      for (int j = 0; j < kTileMaxPerThread; ++j) {
        acc.out[i][j] += a[i] * b[j];
        if constexpr (kTangent) acc.tangent[i][j] += a[i] * rb[j] + ra[i] * b[j];
      }
    }
  }
}

// Output (i, j) of a thread, column col: its sum plus the bias (forward), and its tangent.
template <typename scalar_t>
MAML_HOST_DEVICE scalar_t output_value(const GemmOperands<scalar_t>& ops, const GemmBlock& blk,
                                       const ThreadAccumulators<scalar_t>& acc, int i, int j,
                                       int64_t col) {
  scalar_t value = acc.out[i][j];
  if (ops.bias != nullptr) value += ops.bias[blk.task * ops.bias_task_stride + col];
  return value;
}

template <typename scalar_t>
MAML_HOST_DEVICE scalar_t output_tangent(const GemmOperands<scalar_t>& ops, const GemmBlock& blk,
                                         const ThreadAccumulators<scalar_t>& acc, int i, int j,
                                         int64_t col) {
  scalar_t tangent = acc.tangent[i][j];
  if (ops.bias_tangent != nullptr) {
    tangent += ops.bias_tangent[blk.task * ops.bias_tangent_task_stride + col];
  }
  return tangent;
}

// Phase 3: thread (ty, tx) stores its outputs (plus the bias, in the forward pass) to this split's
// partial sums (the output itself when there is one split).
template <typename scalar_t, typename Problem, bool kTangent>
MAML_HOST_DEVICE void store_outputs(const Problem& problem, const GemmOperands<scalar_t>& ops,
                                    const GemmTiling& t, const GemmBlock& blk, int ty, int tx,
                                    const ThreadAccumulators<scalar_t>& acc) {
  scalar_t* out = ops.out + blk.split * ops.split_stride;
  scalar_t* out_tangent = kTangent ? ops.out_tangent + blk.split * ops.split_stride : nullptr;
  MAML_UNROLL
  for (int i = 0; i < kTileMaxPerThread; ++i) {
    MAML_UNROLL
    for (int j = 0; j < kTileMaxPerThread; ++j) {
      int64_t row, col;
      tile_element(t, blk.block_m_index, blk.block_n_index, ty, tx, i, j, &row, &col);
      if (i >= t.thread_m || j >= t.thread_n || row >= t.rows || col >= t.cols) continue;
      const int64_t offset = problem.out_offset(blk.task, row, col);
      out[offset] = output_value(ops, blk, acc, i, j, col);
      if constexpr (kTangent) out_tangent[offset] = output_tangent(ops, blk, acc, i, j, col);
    }
  }
}

// The batch-norm statistics epilogue of the forward product (ops.statistics set; the forward is
// never split, so each block holds whole sums): per column of its tile, the block's partial
// statistics over its rows (kernels/batch_norm_partials.h), without atomics and in a fixed order.
// For each j < thread_n in turn (the caller unrolls over j, so the accumulators stay registers):
//   phase 4 (every thread): the statistics of its thread_m outputs of column j·threads_n + tx,
//     into scratch[ty][tx];
//   phase 5 (threads with ty = 0): merge scratch[0 .. threads_m)[tx] in ty order and store.
// A round's scratch is consumed before the next round writes it (a barrier after each phase).
template <typename scalar_t>
struct StatisticsScratch {  // shared memory, beside GemmTiles
  PartialStats<scalar_t> column[kTileThreads][kTileThreads];
};

template <typename scalar_t, bool kTangent>
MAML_HOST_DEVICE void stage_column_statistics(const GemmOperands<scalar_t>& ops,
                                              const GemmTiling& t, const GemmBlock& blk, int ty,
                                              int tx, int j,
                                              const ThreadAccumulators<scalar_t>& acc,
                                              StatisticsScratch<scalar_t>& scratch) {
  PartialStats<scalar_t> s = empty_partial<scalar_t>();
  MAML_UNROLL
  for (int i = 0; i < kTileMaxPerThread; ++i) {
    int64_t row, col;
    tile_element(t, blk.block_m_index, blk.block_n_index, ty, tx, i, j, &row, &col);
    if (i >= t.thread_m || row >= t.rows || col >= t.cols) continue;
    add_value(s, output_value(ops, blk, acc, i, j, col),
              kTangent ? output_tangent(ops, blk, acc, i, j, col) : scalar_t(0));
  }
  scratch.column[ty][tx] = s;
}

template <typename scalar_t>
MAML_HOST_DEVICE void merge_column_statistics(const GemmOperands<scalar_t>& ops,
                                              const GemmTiling& t, const GemmBlock& blk, int tx,
                                              int j, const StatisticsScratch<scalar_t>& scratch) {
  int64_t row, col;
  tile_element(t, blk.block_m_index, blk.block_n_index, 0, tx, 0, j, &row, &col);
  if (col >= t.cols) return;
  PartialStats<scalar_t> s = scratch.column[0][tx];
  for (int ty = 1; ty < kTileThreads; ++ty) s = merge_partials(s, scratch.column[ty][tx]);
  store_partial(s, ops.statistics +
                       ((blk.block_m_index * t.tasks + blk.task) * t.cols + col) * kPartialFields);
}

}  // namespace kernels
}  // namespace maml_ext
