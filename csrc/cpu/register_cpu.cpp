// The meta-step ops, registered for CPU tensors: the device-agnostic implementations, except that
// meta_step takes the small-MLP path (mlp_meta_step.cpp) where it applies.
#include <torch/library.h>

#include "../meta_step.h"
#include "mlp_meta_step.h"
#include "vector_isa.h"

namespace maml_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_step_cpu(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order,
    bool inner_lr_grad) {
  const bool mlp = mlp_meta_step_applies(theta, support_x, query_x, program);
  return (mlp ? mlp_meta_step : maml_ext::meta_step)(theta, inner_lr, support_x, support_y,
                                                      query_x, query_y, program, program_floats,
                                                      loss, first_order, inner_lr_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace maml_ext

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) {
  m.impl("meta_step", &maml_ext::cpu::meta_step_cpu);
  m.impl("_mlp_meta_step", &maml_ext::cpu::mlp_meta_step);
  m.impl("adapt", &maml_ext::adapt);
  m.impl("program_forward", &maml_ext::program_forward);
  m.impl("loss_hvp", &maml_ext::loss_hvp);
}

// CPU-only test hook: see vector_isa.h. Returns the previous setting.
TORCH_LIBRARY_FRAGMENT(maml_ext, m) {
  m.def("_force_baseline_cpu_kernels(bool force) -> bool",
        [](bool force) { return maml_ext::cpu::force_baseline_kernels(force); });
}
