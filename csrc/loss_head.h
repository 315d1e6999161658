// The loss heads of the layer program: the per-task mean loss at the program's outputs, its
// gradient and (carrying a tangent) the gradient's tangent, which start the backward pass.
#pragma once

#include <ATen/ATen.h>

#include "program_records.h"

namespace maml_ext {

struct LossHead {
  at::Tensor loss;          // [T] per-task mean loss
  at::Tensor accuracy;      // [T] per-task accuracy (class targets), undefined otherwise
  at::Tensor grad;          // ∂L_t/∂z, shaped like z
  at::Tensor grad_tangent;  // R{∂L_t/∂z}, shaped like z; undefined without a tangent
};

// At outputs z [T, N, ...] (task-major) with tangent rz (undefined: no tangent is carried) against
// targets y ([T, N] class indices, or shaped like z).
LossHead loss_head(LossKind kind, const at::Tensor& z, const at::Tensor& rz, const at::Tensor& y);

}  // namespace maml_ext
