// MetaOptimizer's fixed-rate fused meta-step as one op (schema: maml_ext.cpp): the parameter
// tensors in, their meta-gradients and the step's means out, with one crossing from Python.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace maml_ext {

// params: the parameter tensors in the program's slot order (ProgramRecords::parameters). Runs
// meta_step (through the dispatcher, so each backend's kernel and the CPU MLP path are taken) at
// θ = their concatenation and returns (grads: the meta-gradient split into params' shapes, views
// of one buffer; mean query loss; mean query accuracy, or [0] for MSE; mean support loss;
// finite: 0-d bool, true iff the mean query loss and every gradient element are finite). Reads
// nothing back to the host on a GPU.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_gradient(
    at::TensorList params, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order);

}  // namespace maml_ext
