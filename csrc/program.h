// The layer program: a model's layers in order (csrc/layers/), built from its parsed records
// (program_records.h) with peephole fusions, and its loss head (loss_head.h). One forward and one
// backward give the per-task gradient and, carrying a tangent, the Hessian-vector product.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <vector>

#include "layers/layer.h"
#include "program_records.h"

namespace maml_ext {

struct LossValue {
  at::Tensor loss;      // [T] per-task mean loss
  at::Tensor accuracy;  // [T] per-task accuracy (class targets), undefined otherwise
};

class Program {
 public:
  // The layers of a parsed program (check_parameters_tile has checked its slices); `loss` may be
  // left out for a program that only runs forward.
  explicit Program(const ProgramRecords& records, std::optional<LossKind> loss = std::nullopt);

  // Forward, loss and backward at per-task weights p.theta on (x, y): fills p.grad (and, carrying
  // a tangent, p.grad_tangent = H_L(θ) v). Returns the per-task loss.
  LossValue gradient(const PassParams& p, const at::Tensor& x, const at::Tensor& y);

  // Forward only: the per-task outputs [T, N, ...].
  at::Tensor forward(const at::Tensor& theta, const at::Tensor& x);

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  std::optional<LossKind> loss_;
};

}  // namespace maml_ext
