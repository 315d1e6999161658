// CUDA kernels of maml_ext::task_conv2d / task_conv2d_backward: implicit matrix products, one
// launch per pass for all tasks (the task is blockIdx.z), shared-memory tiles, and the tangent
// fused in: out = A·B and out_tangent = A·RB + RA·B accumulate together from the same tiles, so
// each tile of A (x, or gy) and of B (the weights, or x) is read once for both. Index math:
// kernels/task_conv_math.h; tiles and grid: kernels/conv_tiling.h; host side: task_conv_gemm.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../kernels/conv_tiling.h"
#include "../kernels/task_conv_math.h"
#include "../task_conv.h"
#include "../task_conv_gemm.h"

namespace maml_ext {
namespace {

using kernels::GemmOperands;
using kernels::GemmTiling;

constexpr int kThreads = static_cast<int>(kernels::kGemmThreadsPerDim);  // per block dimension
constexpr int kMaxPerThread = 4;                     // outputs_per_thread() is 1, 2 or 4
constexpr int kMaxTile = kThreads * kMaxPerThread;   // 64
constexpr int kBlockK = static_cast<int>(kernels::kGemmBlockK);

// One block: a block_m x block_n tile of task t's output (split `split` of the reduction). Each
// thread keeps its per_m x per_n outputs (and tangents) in registers; the loops run to the
// compile-time maximum with guards so the accumulators stay in registers.
template <typename scalar_t, typename Problem, bool kTangent>
__global__ void __launch_bounds__(kThreads* kThreads)
    task_gemm_kernel(const Problem problem, const GemmOperands<scalar_t> ops,
                     const GemmTiling tiling) {
  // +1: the reduction-fastest loads of A write down a column; the padding spreads them over banks.
  __shared__ scalar_t a_tile[kBlockK][kMaxTile + 1];
  __shared__ scalar_t b_tile[kBlockK][kMaxTile];
  __shared__ scalar_t ra_tile[kTangent ? kBlockK : 1][kMaxTile + 1];
  __shared__ scalar_t rb_tile[kTangent ? kBlockK : 1][kMaxTile];

  const int64_t task = blockIdx.z / tiling.splits;
  const int64_t split = blockIdx.z % tiling.splits;
  int64_t k_begin, k_end;
  kernels::split_range(tiling, split, &k_begin, &k_end);
  const int per_m = static_cast<int>(tiling.thread_m), per_n = static_cast<int>(tiling.thread_n);
  const int block_m = static_cast<int>(tiling.block_m), block_n = static_cast<int>(tiling.block_n);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * block_m;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * block_n;
  const int tid = threadIdx.y * kThreads + threadIdx.x;
  const int ty = threadIdx.y, tx = threadIdx.x;

  const scalar_t* a = ops.a + task * ops.a_task_stride;
  const scalar_t* b = ops.b + task * ops.b_task_stride;
  // Tangent operands are read only by the kTangent kernel; null ones are zero.
  const scalar_t* ra = kTangent && ops.a_tangent ? ops.a_tangent + task * ops.a_tangent_task_stride : nullptr;
  const scalar_t* rb = kTangent && ops.b_tangent ? ops.b_tangent + task * ops.b_tangent_task_stride : nullptr;

  scalar_t acc[kMaxPerThread][kMaxPerThread];
  scalar_t racc[kMaxPerThread][kMaxPerThread];
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      acc[i][j] = scalar_t(0);
      racc[i][j] = scalar_t(0);
    }
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    for (int e = tid; e < block_m * kBlockK; e += kThreads * kThreads) {
      int kk, mm;
      if constexpr (Problem::kARowFastest) {
        mm = e % block_m;
        kk = e / block_m;
      } else {
        kk = e % kBlockK;
        mm = e / kBlockK;
      }
      const int64_t row = row0 + mm, red = k0 + kk;
      scalar_t value = scalar_t(0), tangent = scalar_t(0);
      if (row < tiling.rows && red < k_end) {
        const int64_t offset = problem.a_offset(task, row, red);
        if (offset >= 0) {
          value = a[offset];
          if (ra != nullptr) tangent = ra[offset];
        }
      }
      a_tile[kk][mm] = value;
      if constexpr (kTangent) ra_tile[kk][mm] = tangent;
    }
    for (int e = tid; e < block_n * kBlockK; e += kThreads * kThreads) {
      const int nn = e % block_n, kk = e / block_n;
      const int64_t col = col0 + nn, red = k0 + kk;
      scalar_t value = scalar_t(0), tangent = scalar_t(0);
      if (col < tiling.cols && red < k_end) {
        const int64_t offset = problem.b_offset(task, red, col);
        if (offset >= 0) {
          value = b[offset];
          if (rb != nullptr) tangent = rb[offset];
        }
      }
      b_tile[kk][nn] = value;
      if constexpr (kTangent) rb_tile[kk][nn] = tangent;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockK; ++kk) {
      scalar_t a_frag[kMaxPerThread], b_frag[kMaxPerThread];
      scalar_t ra_frag[kMaxPerThread], rb_frag[kMaxPerThread];
#pragma unroll
      for (int i = 0; i < kMaxPerThread; ++i) {
        a_frag[i] = i < per_m ? a_tile[kk][i * kThreads + ty] : scalar_t(0);
        if constexpr (kTangent) {
          ra_frag[i] = i < per_m ? ra_tile[kk][i * kThreads + ty] : scalar_t(0);
        }
      }
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        b_frag[j] = j < per_n ? b_tile[kk][j * kThreads + tx] : scalar_t(0);
        if constexpr (kTangent) {
          rb_frag[j] = j < per_n ? rb_tile[kk][j * kThreads + tx] : scalar_t(0);
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kMaxPerThread; ++j) {
          acc[i][j] += a_frag[i] * b_frag[j];
          if constexpr (kTangent) racc[i][j] += a_frag[i] * rb_frag[j] + ra_frag[i] * b_frag[j];
        }
      }
    }
    __syncthreads();
  }

  scalar_t* out = ops.out + split * ops.split_stride;
  scalar_t* out_tangent = kTangent ? ops.out_tangent + split * ops.split_stride : nullptr;
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      int64_t row, col;
      kernels::tile_element(tiling, blockIdx.x, blockIdx.y, ty, tx, i, j, &row, &col);
      if (i >= per_m || j >= per_n || row >= tiling.rows || col >= tiling.cols) continue;
      const int64_t offset = problem.out_offset(task, row, col);
      scalar_t value = acc[i][j];
      if (ops.bias != nullptr) value += ops.bias[task * ops.bias_task_stride + col];
      out[offset] = value;
      if constexpr (kTangent) {
        scalar_t tangent = racc[i][j];
        if (ops.bias_tangent != nullptr) {
          tangent += ops.bias_tangent[task * ops.bias_tangent_task_stride + col];
        }
        out_tangent[offset] = tangent;
      }
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
  void run(const Problem& problem, const GemmOperands<scalar_t>& ops, const GemmTiling& tiling) const {
    const dim3 grid(static_cast<unsigned>(tiling.grid_m), static_cast<unsigned>(tiling.grid_n),
                    static_cast<unsigned>(tiling.tasks * tiling.splits));
    const dim3 block(static_cast<unsigned>(tiling.threads_n), static_cast<unsigned>(tiling.threads_m));
    const auto stream = c10::cuda::getCurrentCUDAStream(device);
    if (ops.out_tangent != nullptr) {
      task_gemm_kernel<scalar_t, Problem, true><<<grid, block, 0, stream>>>(problem, ops, tiling);
    } else {
      task_gemm_kernel<scalar_t, Problem, false><<<grid, block, 0, stream>>>(problem, ops, tiling);
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
  m.impl("task_conv2d_backward", &task_conv2d_backward_cuda);
}

}  // namespace maml_ext
