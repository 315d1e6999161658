// The CPU meta-step for small multilayer perceptrons: see mlp_meta_step.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace maml_ext {
namespace cpu {

// True when the MLP path takes these arguments: a program of Linear and ReLU layers only, small
// widths, flat per-sample inputs [T, N, features], CPU tensors. Arguments the general path would
// reject are left to it (it names them in its error), so this only says "fast path or not".
bool mlp_meta_step_applies(const at::Tensor& theta, const at::Tensor& support_x,
                           const at::Tensor& query_x, at::IntArrayRef program);

// maml_ext::meta_step's contract (meta_step.h), computed by the MLP path; raises where it does not
// apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order,
    bool inner_lr_grad);

}  // namespace cpu
}  // namespace maml_ext
