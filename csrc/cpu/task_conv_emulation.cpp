// CPU test hooks for the CUDA convolution kernels (which cannot run without a GPU):
//   _task_conv2d_emulated / _task_conv2d_with_statistics_emulated / _task_conv2d_backward_emulated
//   run the CUDA implementation's host side
//     (../task_conv_gemm.h) with an executor that runs the kernel's body (kernels/task_gemm_tile.h)
//     for every block and thread of its grid serially, so they check the kernel's tiling,
//     shared-memory staging and index math, everything but the GPU's concurrency;
//   _task_conv2d_launch_config / _task_conv2d_tile_coverage expose the launch plan and count how
//     often the plan's grid writes each output element and reads each reduction index.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../kernels/conv_tiling.h"
#include "../kernels/task_conv_math.h"
#include "../kernels/task_gemm_tile.h"
#include "../task_conv.h"
#include "../task_conv_gemm.h"

namespace maml_ext {
namespace {

using kernels::GemmOperands;
using kernels::GemmTiling;

// Runs the kernel's phases (kernels/task_gemm_tile.h) for every thread of every block, phase by
// phase as __syncthreads() orders them.
struct EmulationExecutor {
  int64_t sm_count;

  int64_t multiprocessors() const { return sm_count; }

  template <typename scalar_t, typename Problem>
  void run(const Problem& problem, const GemmOperands<scalar_t>& ops, const GemmTiling& t) const {
    if (ops.out_tangent != nullptr) {
      run_grid<scalar_t, Problem, true>(problem, ops, t);
    } else {
      run_grid<scalar_t, Problem, false>(problem, ops, t);
    }
  }

  template <typename scalar_t, typename Problem, bool kTangent>
  static void run_grid(const Problem& problem, const GemmOperands<scalar_t>& ops,
                       const GemmTiling& t) {
    constexpr int kThreads = kernels::kTileThreads;
    // Blocks of different grid z (task, split) write disjoint outputs.
    at::parallel_for(0, t.tasks * t.splits, 1, [&](int64_t begin, int64_t end) {
      auto tiles = std::make_unique<kernels::GemmTiles<scalar_t, kTangent>>();
      auto scratch = std::make_unique<kernels::StatisticsScratch<scalar_t>>();
      std::vector<kernels::ThreadAccumulators<scalar_t>> acc(kThreads * kThreads);
      for (int64_t z = begin; z < end; ++z) {
        for (int64_t x = 0; x < t.grid_m; ++x) {
          for (int64_t y = 0; y < t.grid_n; ++y) {
            const auto block = kernels::gemm_block(t, x, y, z);
            const auto operands = kernels::task_operands<scalar_t, kTangent>(ops, block.task);
            for (auto& a : acc) kernels::zero_accumulators(a);
            for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += kernels::kTileK) {
              for (int tid = 0; tid < kThreads * kThreads; ++tid) {
                kernels::stage_tiles<scalar_t, Problem, kTangent>(problem, operands, t, block, k0,
                                                                  tid, *tiles);
              }
              for (int tid = 0; tid < kThreads * kThreads; ++tid) {
                kernels::accumulate_tile<scalar_t, kTangent>(*tiles, t, tid / kThreads,
                                                             tid % kThreads, acc[tid]);
              }
            }
            for (int tid = 0; tid < kThreads * kThreads; ++tid) {
              kernels::store_outputs<scalar_t, Problem, kTangent>(
                  problem, ops, t, block, tid / kThreads, tid % kThreads, acc[tid]);
            }
            if constexpr (kernels::kHasStatistics<Problem>) {
              if (ops.statistics != nullptr) {
                for (int j = 0; j < t.thread_n; ++j) {
                  for (int tid = 0; tid < kThreads * kThreads; ++tid) {
                    kernels::stage_column_statistics<scalar_t, kTangent>(
                        ops, t, block, tid / kThreads, tid % kThreads, j, acc[tid], *scratch);
                  }
                  for (int tx = 0; tx < kThreads; ++tx) {
                    kernels::merge_column_statistics(ops, t, block, tx, j, *scratch);
                  }
                }
              }
            }
          }
        }
      }
    });
  }
};

TaskConvForwardResult task_conv2d_emulated(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride, at::IntArrayRef padding,
    int64_t multiprocessors) {
  MAML_CHECK_ARG(multiprocessors >= 1, "multiprocessors", "expected >= 1, got ", multiprocessors);
  return task_conv_gemm::forward(EmulationExecutor{multiprocessors}, x, x_tangent, weight,
                                 weight_tangent, bias, bias_tangent, stride, padding);
}

TaskConvStatisticsResult task_conv2d_with_statistics_emulated(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride, at::IntArrayRef padding,
    int64_t multiprocessors) {
  MAML_CHECK_ARG(multiprocessors >= 1, "multiprocessors", "expected >= 1, got ", multiprocessors);
  return task_conv_gemm::forward_with_statistics(EmulationExecutor{multiprocessors}, x, x_tangent,
                                                 weight, weight_tangent, bias, bias_tangent, stride,
                                                 padding);
}

TaskConvBackwardResult task_conv2d_backward_emulated(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_y_tangent, const at::Tensor& x,
    const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding, bool need_input_grad, bool has_bias, int64_t multiprocessors) {
  MAML_CHECK_ARG(multiprocessors >= 1, "multiprocessors", "expected >= 1, got ", multiprocessors);
  return task_conv_gemm::backward(EmulationExecutor{multiprocessors}, grad_y, grad_y_tangent, x,
                                  x_tangent, weight, weight_tangent, stride, padding,
                                  need_input_grad, has_bias);
}

// shape_args: pass (0 forward, 1 backward data, 2 weight gradient), N, T, C, H, W, O, kh, kw,
// stride_h, stride_w, pad_h, pad_w, multiprocessors.
GemmTiling plan_from_args(at::IntArrayRef args) {
  MAML_CHECK_ARG(args.size() == 14, "shape_args",
                 "expected [pass, N, T, C, H, W, O, kh, kw, stride_h, stride_w, pad_h, pad_w, "
                 "multiprocessors], got ",
                 args.size(), " values");
  MAML_CHECK_ARG(args[0] >= 0 && args[0] <= 2, "shape_args", "pass must be 0, 1 or 2, got ",
                 args[0]);
  for (size_t k = 1; k < args.size(); ++k) {
    MAML_CHECK_ARG(args[k] >= (k == 11 || k == 12 ? 0 : 1), "shape_args", "value ", k,
                   " must be positive (paddings non-negative), got ", args[k]);
  }
  kernels::ConvGeometry g{};
  g.batch = args[1];
  g.tasks = args[2];
  g.in_channels = args[3];
  g.in_h = args[4];
  g.in_w = args[5];
  g.out_channels = args[6];
  g.kernel_h = args[7];
  g.kernel_w = args[8];
  g.stride_h = args[9];
  g.stride_w = args[10];
  g.pad_h = args[11];
  g.pad_w = args[12];
  MAML_CHECK_ARG(g.in_h + 2 * g.pad_h >= g.kernel_h && g.in_w + 2 * g.pad_w >= g.kernel_w,
                 "shape_args", "the padded input is smaller than the kernel");
  g.out_h = kernels::conv_output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h);
  g.out_w = kernels::conv_output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w);
  return kernels::plan_conv_pass(g, static_cast<kernels::ConvPass>(args[0]), args[13]);
}

}  // namespace

std::vector<int64_t> task_conv2d_launch_config(at::IntArrayRef shape_args) {
  const GemmTiling t = plan_from_args(shape_args);
  return {t.rows,     t.cols,      t.reduction, t.tasks,   t.thread_m,
          t.thread_n, t.threads_m, t.threads_n, t.block_m, t.block_n,
          t.block_k,  t.grid_m,    t.grid_n,    t.splits,  t.split_length};
}

// writes[t, s, row, col]: how many (block, thread, element) of the grid store output element
// (row, col) of task t's split s; reads[red]: how many (split, k-tile, tile index) of one task
// cover reduction index red, walking k-tiles the way the kernel does.
std::tuple<at::Tensor, at::Tensor> task_conv2d_tile_coverage(at::IntArrayRef shape_args) {
  const GemmTiling t = plan_from_args(shape_args);
  auto writes = at::zeros({t.tasks, t.splits, t.rows, t.cols}, at::kLong);
  auto reads = at::zeros({t.reduction}, at::kLong);
  auto w = writes.accessor<int64_t, 4>();
  auto r = reads.accessor<int64_t, 1>();
  for (int64_t z = 0; z < t.tasks * t.splits; ++z) {
    const int64_t task = z / t.splits, split = z % t.splits;
    for (int64_t bm = 0; bm < t.grid_m; ++bm) {
      for (int64_t bn = 0; bn < t.grid_n; ++bn) {
        for (int64_t ty = 0; ty < t.threads_m; ++ty) {
          for (int64_t tx = 0; tx < t.threads_n; ++tx) {
            for (int64_t i = 0; i < t.thread_m; ++i) {
              for (int64_t j = 0; j < t.thread_n; ++j) {
                int64_t row, col;
                kernels::tile_element(t, bm, bn, ty, tx, i, j, &row, &col);
                if (row < t.rows && col < t.cols) ++w[task][split][row][col];
              }
            }
          }
        }
      }
    }
  }
  for (int64_t split = 0; split < t.splits; ++split) {
    int64_t k_begin, k_end;
    kernels::split_range(t, split, &k_begin, &k_end);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += t.block_k) {
      for (int64_t kk = 0; kk < t.block_k; ++kk) {
        if (k0 + kk < k_end) ++r[k0 + kk];
      }
    }
  }
  return {writes, reads};
}

TORCH_LIBRARY_IMPL(maml_ext_testing, CPU, m) {
  m.impl("_task_conv2d_emulated", &task_conv2d_emulated);
  m.impl("_task_conv2d_with_statistics_emulated", &task_conv2d_with_statistics_emulated);
  m.impl("_task_conv2d_backward_emulated", &task_conv2d_backward_emulated);
}

}  // namespace maml_ext
