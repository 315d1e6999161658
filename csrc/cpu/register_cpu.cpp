// CPU kernels of the meta-step ops: meta_step takes the small-MLP path (mlp_meta_step.cpp) where it
// applies and the device-agnostic general path otherwise; the program is parsed once for both.
#include <torch/library.h>

#include "../meta_step.h"
#include "mlp_meta_step.h"

namespace maml_ext {
namespace cpu {
namespace {

MetaStepResult meta_step_cpu(const at::Tensor& theta, const at::Tensor& inner_lr,
                             const at::Tensor& support_x, const at::Tensor& support_y,
                             const at::Tensor& query_x, const at::Tensor& query_y,
                             at::IntArrayRef program, at::ArrayRef<double> program_floats,
                             int64_t loss, bool first_order, bool inner_lr_grad) {
  const auto records = parse_program(program, program_floats);
  const LossKind kind = loss_kind(loss);
  if (auto result = try_mlp_meta_step(records, kind, theta, inner_lr, support_x, support_y, query_x,
                                      query_y, first_order, inner_lr_grad)) {
    return *std::move(result);
  }
  return general_meta_step(records, kind, theta, inner_lr, support_x, support_y, query_x, query_y,
                           first_order, inner_lr_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace maml_ext

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) { m.impl("meta_step", &maml_ext::cpu::meta_step_cpu); }

TORCH_LIBRARY_IMPL(maml_ext_testing, CPU, m) {
  m.impl("_mlp_meta_step", &maml_ext::cpu::mlp_meta_step);
}
