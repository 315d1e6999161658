// CPU kernel of maml_ext::softmax_cross_entropy: rows in parallel, arithmetic shared with CUDA.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/softmax_cross_entropy_math.h"
#include "../softmax_cross_entropy.h"

namespace maml_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& tangent) {
  check_softmax_cross_entropy_args(logits, target, tangent);
  const auto z = logits.contiguous();
  const auto t = target.contiguous();
  const bool with_tangent = tangent.has_value() && tangent->defined();
  const auto rz = with_tangent ? tangent->contiguous() : at::Tensor();
  const int64_t rows = z.size(0), classes = z.size(1);
  auto loss = at::empty({rows}, z.options());
  auto correct = at::empty({rows}, z.options());
  auto grad = at::empty_like(z);
  auto grad_tangent = with_tangent ? at::empty_like(z) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_cross_entropy_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const scalar_t* rz_ptr = with_tangent ? rz.data_ptr<scalar_t>() : nullptr;
    const int64_t* t_ptr = t.data_ptr<int64_t>();
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    scalar_t* correct_ptr = correct.data_ptr<scalar_t>();
    scalar_t* g_ptr = grad.data_ptr<scalar_t>();
    scalar_t* rg_ptr = with_tangent ? grad_tangent.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t offset = r * classes;
        loss_ptr[r] = kernels::softmax_cross_entropy_row<scalar_t>(
            z_ptr + offset, rz_ptr ? rz_ptr + offset : nullptr, t_ptr[r], classes, g_ptr + offset,
            rg_ptr ? rg_ptr + offset : nullptr, correct_ptr + r);
      }
    });
  });
  return {loss, correct, grad, grad_tangent};
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
}

}  // namespace maml_ext
