// CUDA kernel of maml_ext::task_loss (task_loss.h): one thread per task, running the same
// kernels/loss_math.h functions as the CPU kernel and the CPU MLP path. A meta-batch has tens of
// tasks of a few hundred to a few thousand outputs: microseconds next to the network's passes.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/loss_math.h"
#include "../task_loss.h"

namespace maml_ext {
namespace {

template <typename scalar_t>
__global__ void task_cross_entropy_kernel(
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ z_tangent,
    const int64_t* __restrict__ labels, int64_t tasks, int64_t rows, int64_t classes,
    scalar_t* __restrict__ loss, scalar_t* __restrict__ accuracy, scalar_t* __restrict__ grad,
    scalar_t* __restrict__ grad_tangent) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tasks) return;
  const int64_t at = t * rows * classes;
  loss[t] = kernels::mean_cross_entropy<scalar_t>(
      z + at, z_tangent ? z_tangent + at : nullptr, labels + t * rows, rows, classes, grad + at,
      grad_tangent ? grad_tangent + at : nullptr, accuracy + t);
}

template <typename scalar_t>
__global__ void task_squared_error_kernel(const scalar_t* __restrict__ z,
                                          const scalar_t* __restrict__ z_tangent,
                                          const scalar_t* __restrict__ y, int64_t tasks,
                                          int64_t outputs, scalar_t* __restrict__ loss,
                                          scalar_t* __restrict__ grad,
                                          scalar_t* __restrict__ grad_tangent) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tasks) return;
  const int64_t at = t * outputs;
  loss[t] = kernels::mean_squared_error<scalar_t>(z + at, z_tangent ? z_tangent + at : nullptr,
                                                  y + at, outputs, grad + at,
                                                  grad_tangent ? grad_tangent + at : nullptr);
}

template <typename scalar_t>
__global__ void task_gaussian_nll_kernel(const scalar_t* __restrict__ z,
                                         const scalar_t* __restrict__ z_tangent,
                                         const scalar_t* __restrict__ y, int64_t tasks,
                                         int64_t rows, int64_t width, scalar_t* __restrict__ loss,
                                         scalar_t* __restrict__ grad,
                                         scalar_t* __restrict__ grad_tangent) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tasks) return;
  const int64_t at = t * rows * width;
  loss[t] = kernels::mean_gaussian_nll<scalar_t>(z + at, z_tangent ? z_tangent + at : nullptr,
                                                 y + at, rows, width, grad + at,
                                                 grad_tangent ? grad_tangent + at : nullptr);
}

TaskLossResult task_loss_cuda(const at::Tensor& z_in, const std::optional<at::Tensor>& z_tangent,
                              const at::Tensor& y_in, int64_t loss) {
  const LossKind kind = check_task_loss_args(z_in, z_tangent, y_in, loss);
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const bool with_tangent = given(z_tangent);
  const auto z = z_in.contiguous(), y = y_in.contiguous();
  const auto rz = with_tangent ? z_tangent->contiguous() : at::Tensor();
  auto result = empty_task_loss_result(z, with_tangent, kind);
  auto& [task_loss, accuracy, grad, grad_tangent] = result;
  const int64_t tasks = z.size(0);
  if (tasks == 0 || z.numel() == 0) return result;
  constexpr int threads = 64;
  const int blocks = static_cast<int>((tasks + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "task_loss_cuda", [&] {
    const scalar_t* rz_ptr = with_tangent ? rz.data_ptr<scalar_t>() : nullptr;
    scalar_t* rg_ptr = with_tangent ? grad_tangent.data_ptr<scalar_t>() : nullptr;
    if (kind == LossKind::kCrossEntropy) {
      task_cross_entropy_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          z.data_ptr<scalar_t>(), rz_ptr, y.data_ptr<int64_t>(), tasks, z.size(1), z.size(2),
          task_loss.data_ptr<scalar_t>(), accuracy.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
          rg_ptr);
    } else if (kind == LossKind::kGaussianNll) {
      task_gaussian_nll_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          z.data_ptr<scalar_t>(), rz_ptr, y.data_ptr<scalar_t>(), tasks, z.size(1), z.size(2),
          task_loss.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), rg_ptr);
    } else {
      task_squared_error_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          z.data_ptr<scalar_t>(), rz_ptr, y.data_ptr<scalar_t>(), tasks, z.numel() / tasks,
          task_loss.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), rg_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CUDA, m) { m.impl("task_loss", &task_loss_cuda); }

}  // namespace maml_ext
