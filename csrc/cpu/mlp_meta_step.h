// The CPU meta-step for small multilayer perceptrons: see mlp_meta_step.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../meta_step.h"
#include "../program_records.h"

namespace maml_ext {
namespace cpu {

// maml_ext::meta_step's contract (meta_step.h) computed by the MLP path, or nullopt where the path
// does not take these arguments: it takes programs of Linear and ReLU layers only, at most
// kMaxWidth wide, flat per-sample inputs [T, N, features], CPU tensors. Arguments the general path
// would reject are checked as it checks them (errors name the argument).
std::optional<MetaStepResult> try_mlp_meta_step(
    const ProgramRecords& program, LossKind loss, const at::Tensor& theta,
    const at::Tensor& inner_lr, const at::Tensor& support_x, const at::Tensor& support_y,
    const at::Tensor& query_x, const at::Tensor& query_y, bool first_order, bool inner_lr_grad);

// The test hook maml_ext_testing::_mlp_meta_step: meta_step's schema, by the MLP path only;
// raises (argument 'program') where the path does not apply.
MetaStepResult mlp_meta_step(const at::Tensor& theta, const at::Tensor& inner_lr,
                             const at::Tensor& support_x, const at::Tensor& support_y,
                             const at::Tensor& query_x, const at::Tensor& query_y,
                             at::IntArrayRef program, at::ArrayRef<double> program_floats,
                             int64_t loss, bool first_order, bool inner_lr_grad);

}  // namespace cpu
}  // namespace maml_ext
