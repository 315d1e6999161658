// The fused meta-step and its companions, device-agnostic (registered for CPU in cpu/ and for CUDA
// in cuda/). Schemas: maml_ext.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace maml_ext {

// K inner steps per task from the shared θ, the query loss, and its gradient with respect to θ
// (and to the per-element inner rates) by the explicit reverse sweep of DESIGN.md.
// Returns (query_loss [T], query_accuracy [T] or [0], support_loss [T] at θ, meta_grad [P],
// inner_lr_grad [K, P] or [0]); meta_grad and inner_lr_grad are of the mean query loss over tasks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_step(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order,
    bool inner_lr_grad);

// The argument checks of meta_step (shapes, dtypes, devices; clear errors naming the argument);
// returns the number of tasks T. For device-specific meta-step kernels that share its contract.
int64_t check_meta_step_args(const at::Tensor& theta, const at::Tensor& inner_lr,
                             const at::Tensor& support_x, const at::Tensor& support_y,
                             const at::Tensor& query_x, const at::Tensor& query_y, int64_t loss);

// K = inner_lr.size(0) steps of SGD per task from theta ([P] shared or [T, P]): the adapted [T, P].
at::Tensor adapt(const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
                 const at::Tensor& support_y, at::IntArrayRef program,
                 at::ArrayRef<double> program_floats, int64_t loss);

// Per-task outputs [T, N, ...] of the program at theta ([P] or [T, P]).
at::Tensor program_forward(const at::Tensor& theta, const at::Tensor& x, at::IntArrayRef program,
                           at::ArrayRef<double> program_floats);

// Per-task loss [T], gradient [T, P] and Hessian-vector product H v [T, P] at theta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_hvp(
    const at::Tensor& theta, const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss);

}  // namespace maml_ext
