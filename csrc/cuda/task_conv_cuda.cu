// CUDA kernels of maml_ext::task_conv2d / task_conv2d_backward: implicit matrix products, one
// launch per pass for all tasks (the task is blockIdx.z), shared-memory tiles, and the tangent
// fused in: out = A·B and out_tangent = A·RB + RA·B accumulate together from the same tiles, so
// each tile of A (x, or gy) and of B (the weights, or x) is read once for both. Index math:
// kernels/task_conv_math.h; tiles and grid: kernels/conv_tiling.h; the kernel body:
// kernels/task_gemm_tile.h; host side: task_conv_gemm.h. The forward can also produce the
// batch-norm partial statistics of its output in an epilogue (task_conv2d_with_statistics).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../kernels/conv_tiling.h"
#include "../kernels/task_conv_math.h"
#include "../kernels/task_gemm_tile.h"
#include "../task_conv.h"
#include "../task_conv_gemm.h"

namespace maml_ext {
namespace {

using kernels::GemmOperands;
using kernels::GemmTiling;

// One block: a block_m x block_n tile of one task's output (one split of its reduction), in the
// phases of kernels/task_gemm_tile.h, which the CPU emulation runs too; with kStatistics, the
// batch-norm statistics epilogue after the store.
template <typename scalar_t, typename Problem, bool kTangent, bool kStatistics>
__global__ void __launch_bounds__(kernels::kTileThreads* kernels::kTileThreads)
    task_gemm_kernel(const Problem problem, const GemmOperands<scalar_t> ops,
                     const GemmTiling tiling) {
  __shared__ kernels::GemmTiles<scalar_t, kTangent> tiles;
  const auto block = kernels::gemm_block(tiling, blockIdx.x, blockIdx.y, blockIdx.z);
  const auto operands = kernels::task_operands<scalar_t, kTangent>(ops, block.task);
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int tid = ty * kernels::kTileThreads + tx;
  kernels::ThreadAccumulators<scalar_t> acc;
  kernels::zero_accumulators(acc);
  for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += kernels::kTileK) {
    kernels::stage_tiles<scalar_t, Problem, kTangent>(problem, operands, tiling, block, k0, tid,
                                                      tiles);
    __syncthreads();
    kernels::accumulate_tile<scalar_t, kTangent>(tiles, tiling, ty, tx, acc);
    __syncthreads();
  }
  kernels::store_outputs<scalar_t, Problem, kTangent>(problem, ops, tiling, block, ty, tx, acc);
  if constexpr (kStatistics) {
    __shared__ kernels::StatisticsScratch<scalar_t> scratch;
    // thread_n is the same for the whole block, so every thread reaches each barrier.
#pragma unroll
    for (int j = 0; j < kernels::kTileMaxPerThread; ++j) {
      if (j >= tiling.thread_n) break;
      kernels::stage_column_statistics<scalar_t, kTangent>(ops, tiling, block, ty, tx, j, acc,
                                                           scratch);
      __syncthreads();
      if (ty == 0) kernels::merge_column_statistics(ops, tiling, block, tx, j, scratch);
      __syncthreads();
    }
  }
}

struct CudaExecutor {
  c10::DeviceIndex device;

  int64_t multiprocessors() const {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }

  template <typename scalar_t, typename Problem>
  void run(const Problem& problem, const GemmOperands<scalar_t>& ops,
           const GemmTiling& tiling) const {
    const dim3 grid(static_cast<unsigned>(tiling.grid_m), static_cast<unsigned>(tiling.grid_n),
                    static_cast<unsigned>(tiling.tasks * tiling.splits));
    const dim3 block(static_cast<unsigned>(tiling.threads_n),
                     static_cast<unsigned>(tiling.threads_m));
    const auto stream = c10::cuda::getCurrentCUDAStream(device);
    const bool tangent = ops.out_tangent != nullptr;
    if constexpr (kernels::kHasStatistics<Problem>) {
      if (ops.statistics != nullptr) {
        if (tangent) {
          task_gemm_kernel<scalar_t, Problem, true, true>
              <<<grid, block, 0, stream>>>(problem, ops, tiling);
        } else {
          task_gemm_kernel<scalar_t, Problem, false, true>
              <<<grid, block, 0, stream>>>(problem, ops, tiling);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    if (tangent) {
      task_gemm_kernel<scalar_t, Problem, true, false>
          <<<grid, block, 0, stream>>>(problem, ops, tiling);
    } else {
      task_gemm_kernel<scalar_t, Problem, false, false>
          <<<grid, block, 0, stream>>>(problem, ops, tiling);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

TaskConvForwardResult task_conv2d_cuda(const at::Tensor& x,
                                       const std::optional<at::Tensor>& x_tangent,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& weight_tangent,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& bias_tangent,
                                       at::IntArrayRef stride, at::IntArrayRef padding) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return task_conv_gemm::forward(CudaExecutor{x.device().index()}, x, x_tangent, weight,
                                 weight_tangent, bias, bias_tangent, stride, padding);
}

TaskConvStatisticsResult task_conv2d_with_statistics_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return task_conv_gemm::forward_with_statistics(CudaExecutor{x.device().index()}, x, x_tangent,
                                                 weight, weight_tangent, bias, bias_tangent, stride,
                                                 padding);
}

TaskConvBackwardResult task_conv2d_backward_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_y_tangent, const at::Tensor& x,
    const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding, bool need_input_grad, bool has_bias) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return task_conv_gemm::backward(CudaExecutor{x.device().index()}, grad_y, grad_y_tangent, x,
                                  x_tangent, weight, weight_tangent, stride, padding,
                                  need_input_grad, has_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CUDA, m) {
  m.impl("task_conv2d", &task_conv2d_cuda);
  m.impl("task_conv2d_with_statistics", &task_conv2d_with_statistics_cuda);
  m.impl("task_conv2d_backward", &task_conv2d_backward_cuda);
}

}  // namespace maml_ext
