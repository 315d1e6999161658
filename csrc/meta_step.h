// The fused meta-step and its companions: device-agnostic kernels (registered once, for
// CompositeExplicitAutograd, in meta_step.cpp; the CPU overrides meta_step for small MLPs in
// cpu/register_cpu.cpp). Schemas: maml_ext.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "program_records.h"

namespace maml_ext {

// (query_loss [T], query_accuracy [T] or [0], support_loss [T] at θ, meta_grad [P],
// inner_lr_grad [K, P] or [0], mean_query_loss: 0-d).
using MetaStepResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// K inner steps per task from the shared θ, the query loss, and its gradient with respect to θ
// (and to the per-element inner rates) by the explicit reverse sweep of docs/reverse_sweep.md.
// meta_grad and inner_lr_grad are gradients of mean_query_loss, the mean of query_loss over tasks.
MetaStepResult meta_step(const at::Tensor& theta, const at::Tensor& inner_lr,
                         const at::Tensor& support_x, const at::Tensor& support_y,
                         const at::Tensor& query_x, const at::Tensor& query_y,
                         at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss,
                         bool first_order, bool inner_lr_grad);

// meta_step at a parsed program, by the general path (the layers of csrc/layers/).
MetaStepResult general_meta_step(const ProgramRecords& program, LossKind loss,
                                 const at::Tensor& theta, const at::Tensor& inner_lr,
                                 const at::Tensor& support_x, const at::Tensor& support_y,
                                 const at::Tensor& query_x, const at::Tensor& query_y,
                                 bool first_order, bool inner_lr_grad);

// The argument checks of meta_step (shapes, dtypes, devices, the program's parameter slices
// against θ; clear errors naming the argument); returns the number of tasks T. For every path that
// computes meta_step.
int64_t check_meta_step_args(const ProgramRecords& program, LossKind loss, const at::Tensor& theta,
                             const at::Tensor& inner_lr, const at::Tensor& support_x,
                             const at::Tensor& support_y, const at::Tensor& query_x,
                             const at::Tensor& query_y);

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
