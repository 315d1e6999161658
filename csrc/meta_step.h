// The fused meta-step and its companions: device-agnostic kernels (registered once, for
// CompositeExplicitAutograd, in meta_step.cpp; the CPU overrides meta_step for small MLPs in
// cpu/register_cpu.cpp). Schemas: maml_ext.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
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

// (query_loss [T] after the last step, query_accuracy [T] or [0], support_loss [T] at θ,
// meta_grad [P], inner_lr_grad [K, P] or [0], inner_shift_grad [K, P] or [0], objective: 0-d).
struct MetaStepOptionsResult {
  at::Tensor query_loss, query_accuracy, support_loss, meta_grad, inner_lr_grad, inner_shift_grad,
      objective;
};

using MetaStepOptionsTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// meta_step with the options of the MAML family's variants (MAML++), by the general path:
// - query_weights [K] (MAML++'s multi-step loss): the objective is Σ_j w_j · (mean query loss
//   after step j), one more query pass per step, whose gradient joins λ in the reverse sweep;
// - inner_shift [K, P]: a step-dependent constant δ_k added to the weights after step k for the
//   support pass of step k + 1 only (θ_{k+1} = θ_k − α_k ⊙ g_k + δ_k); the query pass after step k
//   sees the weights before the shift. Per-step batch-norm parameters enter this way, as the
//   differences of consecutive steps' values, the query after step k using step k's. δ_{K-1}
//   moves nothing (its gradient is zero).
// Undefined options are the plain meta-step. Gradients are of `objective`; nothing is recorded
// for autograd (the caller chains the gradients, maml_ext/backend.py).
MetaStepOptionsTuple meta_step_options(const at::Tensor& theta, const at::Tensor& inner_lr,
                                       const at::Tensor& support_x, const at::Tensor& support_y,
                                       const at::Tensor& query_x, const at::Tensor& query_y,
                                       at::IntArrayRef program, at::ArrayRef<double> program_floats,
                                       int64_t loss, bool first_order, bool inner_lr_grad,
                                       const std::optional<at::Tensor>& query_weights,
                                       const std::optional<at::Tensor>& inner_shift);

// ANIL's meta-step when the layers that take no inner steps are the model's first ones (the body,
// body_program: parameters θ[0, B)) and the adapted ones the rest (the head, head_program, its
// offsets from B; its parameters θ[B, P)). The body's features of the support and query sets are
// computed once at θ and reused by every inner step and sweep pass, which run the head alone; one
// backward through the body at the end carries the features' adjoints (the query gradient, and
// the support features' share of each Hessian-vector product) to its parameters. inner_lr [K, P-B]
// holds the head's rates (the body's are zero); inner_lr_grad is [K, P-B]. The same quantities as
// meta_step with zero rates on the body, at the cost of the head's passes plus one body forward and
// backward per set. Results as meta_step_options (inner_shift_grad [0]).
MetaStepOptionsTuple frozen_body_meta_step(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef body_program, at::ArrayRef<double> body_floats, at::IntArrayRef head_program,
    at::ArrayRef<double> head_floats, int64_t loss, bool first_order, bool inner_lr_grad);

// meta_step_options at a parsed program (undefined tensors for options not used).
MetaStepOptionsResult sweep_meta_step(const ProgramRecords& program, LossKind loss,
                                      const at::Tensor& theta, const at::Tensor& inner_lr,
                                      const at::Tensor& support_x, const at::Tensor& support_y,
                                      const at::Tensor& query_x, const at::Tensor& query_y,
                                      bool first_order, bool inner_lr_grad,
                                      const at::Tensor& query_weights,
                                      const at::Tensor& inner_shift);

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
