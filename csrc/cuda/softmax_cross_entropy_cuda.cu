// CUDA kernel of maml_ext::softmax_cross_entropy: one thread per row (few-shot heads have a handful
// of classes), arithmetic shared with the CPU kernel through kernels/softmax_cross_entropy_math.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/softmax_cross_entropy_math.h"
#include "../softmax_cross_entropy.h"

namespace maml_ext {
namespace {

template <typename scalar_t>
__global__ void softmax_cross_entropy_kernel(const scalar_t* __restrict__ z,
                                             const scalar_t* __restrict__ z_tangent,
                                             const int64_t* __restrict__ target, int64_t rows,
                                             int64_t classes, scalar_t* __restrict__ loss,
                                             scalar_t* __restrict__ correct,
                                             scalar_t* __restrict__ grad,
                                             scalar_t* __restrict__ grad_tangent) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) {
    return;
  }
  const int64_t offset = r * classes;
  loss[r] = kernels::softmax_cross_entropy_row<scalar_t>(
      z + offset, z_tangent ? z_tangent + offset : nullptr, target[r], classes, grad + offset,
      grad_tangent ? grad_tangent + offset : nullptr, correct + r);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& tangent) {
  check_softmax_cross_entropy_args(logits, target, tangent);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const auto z = logits.contiguous();
  const auto t = target.contiguous();
  const bool with_tangent = tangent.has_value() && tangent->defined();
  const auto rz = with_tangent ? tangent->contiguous() : at::Tensor();
  const int64_t rows = z.size(0), classes = z.size(1);
  auto loss = at::empty({rows}, z.options());
  auto correct = at::empty({rows}, z.options());
  auto grad = at::empty_like(z);
  auto grad_tangent = with_tangent ? at::empty_like(z) : at::empty({0}, z.options());
  if (rows == 0) {
    return {loss, correct, grad, grad_tangent};
  }
  constexpr int threads = 128;
  const int blocks = static_cast<int>((rows + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_cross_entropy_cuda", [&] {
    softmax_cross_entropy_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        z.data_ptr<scalar_t>(), with_tangent ? rz.data_ptr<scalar_t>() : nullptr,
        t.data_ptr<int64_t>(), rows, classes, loss.data_ptr<scalar_t>(),
        correct.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
        with_tangent ? grad_tangent.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, correct, grad, grad_tangent};
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CUDA, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cuda);
}

}  // namespace maml_ext
