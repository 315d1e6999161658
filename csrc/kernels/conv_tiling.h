// Tiles and launch grid of the task-batched implicit products (task_conv_math.h), decided from the
// shapes alone in plain C++: the CUDA op launches with it, and the CPU tests check through
// maml_ext::_task_conv2d_launch_config / _task_conv2d_tile_coverage that the grid covers every
// output element exactly once and the k-splits partition the reduction.
//
// One thread block of threads_m x threads_n threads computes a block_m x block_n tile of one task's
// output; each thread thread_m x thread_n elements, strided by the block's thread counts (so
// neighbouring threads store neighbouring columns). Grid: x over row tiles (the largest count),
// y over column tiles, z over (task, split). A product whose reduction is long and whose output is
// small (the weight gradient) is split along the reduction into `splits` chunks of split_length,
// each writing its own partial sums, added afterwards.
#pragma once

#include <algorithm>
#include <cstdint>

#include "task_conv_math.h"

namespace maml_ext {
namespace kernels {

constexpr int64_t kGemmThreadsPerDim = 16;  // 256 threads per block
constexpr int64_t kGemmBlockK = 16;         // reduction depth of one shared-memory tile
constexpr int64_t kMinSplitLength = 512;  // below this a split's work does not pay its launch share
constexpr int64_t kMaxGridYZ = 65535;     // CUDA's limit on gridDim.y and gridDim.z

struct GemmTiling {
  int64_t rows, cols, reduction, tasks;
  int64_t thread_m, thread_n;    // outputs per thread along rows, columns
  int64_t threads_m, threads_n;  // threadIdx.y, threadIdx.x extents
  int64_t block_m, block_n, block_k;
  int64_t grid_m, grid_n, splits, split_length;  // gridDim = (grid_m, grid_n, tasks · splits)
};

// Outputs per thread along one dimension: 4 where the extent fills a 64-wide tile, else fewer so
// small extents (few channels) do not compute padding.
inline int64_t outputs_per_thread(int64_t extent) {
  return extent > 2 * kGemmThreadsPerDim ? 4 : extent > kGemmThreadsPerDim ? 2 : 1;
}

// split_reduction: allow splitting the reduction to fill `multiprocessors` with about four blocks
// each (used for the weight gradient, whose output is small and reduction long).
inline GemmTiling plan_task_gemm(int64_t tasks, int64_t rows, int64_t cols, int64_t reduction,
                                 bool split_reduction, int64_t multiprocessors) {
  GemmTiling t{};
  t.rows = rows;
  t.cols = cols;
  t.reduction = reduction;
  t.tasks = tasks;
  t.thread_m = outputs_per_thread(rows);
  t.thread_n = outputs_per_thread(cols);
  t.threads_m = t.threads_n = kGemmThreadsPerDim;
  t.block_m = t.thread_m * t.threads_m;
  t.block_n = t.thread_n * t.threads_n;
  t.block_k = kGemmBlockK;
  t.grid_m = (rows + t.block_m - 1) / t.block_m;
  t.grid_n = (cols + t.block_n - 1) / t.block_n;
  int64_t splits = 1;
  if (split_reduction) {
    const int64_t blocks = t.grid_m * t.grid_n * tasks;
    const int64_t wanted = (4 * multiprocessors + blocks - 1) / blocks;
    const int64_t most = std::max<int64_t>(1, reduction / kMinSplitLength);
    splits =
        std::clamp<int64_t>(wanted, 1, std::min(most, std::max<int64_t>(1, kMaxGridYZ / tasks)));
  }
  const int64_t length = (reduction + splits - 1) / splits;
  t.split_length = std::max<int64_t>(t.block_k, (length + t.block_k - 1) / t.block_k * t.block_k);
  t.splits = (reduction + t.split_length - 1) / t.split_length;  // no empty split
  return t;
}

// The output element (row, col) that thread (ty, tx) of block (block_m_index, block_n_index)
// computes as its (i, j)-th element; it may lie outside the product (the kernel skips it).
MAML_HOST_DEVICE void tile_element(const GemmTiling& t, int64_t block_m_index,
                                   int64_t block_n_index, int64_t ty, int64_t tx, int64_t i,
                                   int64_t j, int64_t* row, int64_t* col) {
  *row = block_m_index * t.block_m + i * t.threads_m + ty;
  *col = block_n_index * t.block_n + j * t.threads_n + tx;
}

// The reduction range [begin, end) of split `split`.
MAML_HOST_DEVICE void split_range(const GemmTiling& t, int64_t split, int64_t* begin,
                                  int64_t* end) {
  *begin = split * t.split_length;
  const int64_t stop = *begin + t.split_length;
  *end = stop < t.reduction ? stop : t.reduction;
}

enum class ConvPass : int64_t { kForward = 0, kBackwardData = 1, kWeightGrad = 2 };

// The launch plan of one pass of a convolution of geometry g.
inline GemmTiling plan_conv_pass(const ConvGeometry& g, ConvPass pass, int64_t multiprocessors) {
  switch (pass) {
    case ConvPass::kForward: {
      const ForwardGemm p{g};
      return plan_task_gemm(g.tasks, p.rows(), p.cols(), p.reduction(), false, multiprocessors);
    }
    case ConvPass::kBackwardData: {
      const BackwardDataGemm p{g};
      return plan_task_gemm(g.tasks, p.rows(), p.cols(), p.reduction(), false, multiprocessors);
    }
    case ConvPass::kWeightGrad:
    default: {
      const WeightGradGemm p{g};
      return plan_task_gemm(g.tasks, p.rows(), p.cols(), p.reduction(), true, multiprocessors);
    }
  }
}

}  // namespace kernels
}  // namespace maml_ext
