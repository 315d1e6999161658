// CPU kernel of maml_ext::task_loss (task_loss.h): tasks in parallel, each by kernels/loss_math.h,
// the same functions the CPU MLP path and the CUDA kernel run.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/loss_math.h"
#include "../task_loss.h"

namespace maml_ext {
namespace {

TaskLossResult task_loss_cpu(const at::Tensor& z_in, const std::optional<at::Tensor>& z_tangent,
                             const at::Tensor& y_in, int64_t loss) {
  const LossKind kind = check_task_loss_args(z_in, z_tangent, y_in, loss);
  const bool with_tangent = given(z_tangent);
  const auto z = z_in.contiguous(), y = y_in.contiguous();
  const auto rz = with_tangent ? z_tangent->contiguous() : at::Tensor();
  auto result = empty_task_loss_result(z, with_tangent, kind);
  auto& [task_loss, accuracy, grad, grad_tangent] = result;
  const int64_t tasks = z.size(0), per_task = tasks > 0 ? z.numel() / tasks : 0;
  // Threads only where a share of tasks outweighs the hand-off (a few thousand values).
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(per_task, 1));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "task_loss_cpu", [&] {
    const scalar_t* z_ptr = z.data_ptr<scalar_t>();
    const scalar_t* rz_ptr = with_tangent ? rz.data_ptr<scalar_t>() : nullptr;
    scalar_t* loss_ptr = task_loss.data_ptr<scalar_t>();
    scalar_t* g_ptr = grad.data_ptr<scalar_t>();
    scalar_t* rg_ptr = with_tangent ? grad_tangent.data_ptr<scalar_t>() : nullptr;
    if (kind == LossKind::kCrossEntropy) {
      const int64_t rows = z.size(1), classes = z.size(2);
      const int64_t* labels = y.data_ptr<int64_t>();
      scalar_t* accuracy_ptr = accuracy.data_ptr<scalar_t>();
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t at = t * per_task;
          loss_ptr[t] = kernels::mean_cross_entropy<scalar_t>(
              z_ptr + at, rz_ptr ? rz_ptr + at : nullptr, labels + t * rows, rows, classes,
              g_ptr + at, rg_ptr ? rg_ptr + at : nullptr, accuracy_ptr + t);
        }
      });
    } else if (kind == LossKind::kGaussianNll) {
      const scalar_t* y_ptr = y.data_ptr<scalar_t>();
      const int64_t rows = z.size(1), width = z.size(2);
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t at = t * per_task;
          loss_ptr[t] = kernels::mean_gaussian_nll<scalar_t>(
              z_ptr + at, rz_ptr ? rz_ptr + at : nullptr, y_ptr + at, rows, width, g_ptr + at,
              rg_ptr ? rg_ptr + at : nullptr);
        }
      });
    } else {
      const scalar_t* y_ptr = y.data_ptr<scalar_t>();
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t at = t * per_task;
          loss_ptr[t] = kernels::mean_squared_error<scalar_t>(
              z_ptr + at, rz_ptr ? rz_ptr + at : nullptr, y_ptr + at, per_task, g_ptr + at,
              rg_ptr ? rg_ptr + at : nullptr);
        }
      });
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) { m.impl("task_loss", &task_loss_cpu); }

}  // namespace maml_ext
