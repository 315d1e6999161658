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

  // After forward (the layers keep their tape): the backward from the gradient of the outputs
  // (shaped as forward returned them), filling p.grad. For a program that runs the first layers of
  // a model whose outputs feed the rest (ANIL's frozen body, csrc/meta_step.cpp).
  void backward(const PassParams& p, const at::Tensor& grad_output);

  // gradient, also returning the gradient of the loss with respect to the inputs x (and, carrying
  // a tangent, its tangent) in input_grad / input_grad_tangent. For a program whose inputs are the
  // features of the layers before it (ANIL's head).
  LossValue gradient_with_input_grad(const PassParams& p, const at::Tensor& x, const at::Tensor& y,
                                     at::Tensor& input_grad, at::Tensor& input_grad_tangent);

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  std::optional<LossKind> loss_;
};

}  // namespace maml_ext
