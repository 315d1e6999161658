// maml_ext::task_loss: the per-task losses at a layer program's outputs, with their gradients and
// tangents, by the definitions of kernels/loss_math.h (which the CPU MLP path runs too, so every
// path computes the same losses from one definition).
//
// z [T, N, ...] outputs (task-major); z_tangent shaped like z, or absent; y [T, N] int64 class
// indices (cross-entropy: z must be [T, N, classes]) or targets shaped like z (mean-squared
// error; the Gaussian NLL's z = [means | log-stds] [T, N, 2A] and y = [values | weights]). Returns
// (loss [T], accuracy [T] (cross-entropy) or [0], grad = ∂L_t/∂z shaped like z, grad_tangent =
// R{grad} shaped like z, or [0] without z_tangent). A class index outside [0, classes) makes its
// task's loss and gradients NaN, on every device alike.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "program_records.h"

namespace maml_ext {

using TaskLossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's argument checks, shared by its CPU and CUDA kernels.
inline LossKind check_task_loss_args(const at::Tensor& z,
                                     const std::optional<at::Tensor>& z_tangent,
                                     const at::Tensor& y, int64_t loss) {
  const LossKind kind = loss_kind(loss);
  check_floating(z, "z");
  MAML_CHECK_ARG(z.dim() >= 2, "z", "expected task-batched outputs [T, N, ...], got shape ",
                 z.sizes());
  check_like(z_tangent, z, "z_tangent");
  MAML_CHECK_ARG(y.device() == z.device(), "y", "expected a tensor on ", z.device(),
                 ", got one on ", y.device());
  if (has_class_targets(kind)) {
    MAML_CHECK_ARG(z.dim() == 3 && z.size(2) > 0, "z",
                   "cross-entropy needs outputs [T, N, classes], got shape ", z.sizes());
    MAML_CHECK_ARG(y.scalar_type() == at::kLong, "y", "expected int64 class indices, got ",
                   y.scalar_type());
    MAML_CHECK_ARG(y.dim() == 2 && y.size(0) == z.size(0) && y.size(1) == z.size(1), "y",
                   "expected class indices [", z.size(0), ", ", z.size(1), "], got shape ",
                   y.sizes());
  } else {
    if (kind == LossKind::kGaussianNll) {
      MAML_CHECK_ARG(z.dim() == 3 && z.size(2) > 0 && z.size(2) % 2 == 0, "z",
                     "gaussian_nll needs outputs [T, N, 2A] (means, then log-stds), got shape ",
                     z.sizes());
    }
    MAML_CHECK_ARG(y.scalar_type() == z.scalar_type(), "y", "expected dtype ", z.scalar_type(),
                   ", got ", y.scalar_type());
    MAML_CHECK_ARG(y.sizes() == z.sizes(), "y", "expected targets shaped like the outputs ",
                   z.sizes(), ", got ", y.sizes());
  }
  return kind;
}

// The op's outputs, allocated for the kernels to fill.
inline TaskLossResult empty_task_loss_result(const at::Tensor& z, bool with_tangent,
                                             LossKind kind) {
  const int64_t tasks = z.size(0);
  return {at::empty({tasks}, z.options()),
          at::empty({has_class_targets(kind) ? tasks : 0}, z.options()),
          at::empty(z.sizes(), z.options()),
          with_tangent ? at::empty(z.sizes(), z.options()) : at::empty({0}, z.options())};
}

// Calls the op through the dispatcher (the CPU or CUDA kernel by the tensors' device); an
// undefined z_tangent is the schema's None.
TaskLossResult task_loss(const at::Tensor& z, const at::Tensor& z_tangent, const at::Tensor& y,
                         LossKind kind);

}  // namespace maml_ext
