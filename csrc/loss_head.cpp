#include "loss_head.h"

#include "checks.h"
#include "kernels/loss_math.h"
#include "softmax_cross_entropy.h"

namespace maml_ext {
namespace {

// The definitions and gradient scales are kernels/loss_math.h's, which the CPU MLP path runs on raw
// memory; here they are tensor ops over all tasks [T, N, ...].

// L_t = (1/N) Σ_r ce(z_r, y_r); ∂L_t/∂z_r = (softmax(z_r) − onehot(y_r)) / N, likewise its tangent;
// the per-row terms come from the softmax_cross_entropy op (CPU and CUDA kernels).
LossHead cross_entropy(const at::Tensor& z, const at::Tensor& rz, const at::Tensor& y) {
  MAML_CHECK_ARG(z.dim() == 3, "model", "cross-entropy needs outputs [T, N, classes], got ",
                 z.sizes());
  const int64_t tasks = z.size(0), rows = z.size(1), classes = z.size(2);
  auto [loss_rows, correct, grad, grad_tangent] =
      softmax_cross_entropy(z.reshape({tasks * rows, classes}), y.reshape({tasks * rows}),
                            rz.defined() ? rz.reshape({tasks * rows, classes}) : at::Tensor());
  LossHead head;
  head.loss = loss_rows.view({tasks, rows}).mean(1);
  head.accuracy = correct.view({tasks, rows}).mean(1);
  const double scale = kernels::cross_entropy_gradient_scale<double>(rows);
  head.grad = grad.view(z.sizes()).mul_(scale);
  if (rz.defined()) head.grad_tangent = grad_tangent.view(z.sizes()).mul_(scale);
  return head;
}

// L_t = (1/m) Σ_e (z_e − y_e)² over the task's m outputs; ∂L_t/∂z = (2/m)(z − y), R{·} = (2/m)
// R{z}.
LossHead mean_squared_error(const at::Tensor& z, const at::Tensor& rz, const at::Tensor& y) {
  MAML_CHECK_ARG(y.sizes() == z.sizes(), "y", "expected targets shaped like the outputs ",
                 z.sizes(), ", got ", y.sizes());
  const int64_t tasks = z.size(0);
  const double scale = kernels::squared_error_gradient_scale<double>(z.numel() / tasks);
  auto diff = z - y;
  LossHead head;
  head.loss = diff.square().reshape({tasks, -1}).mean(1);
  head.grad = diff.mul_(scale);
  if (rz.defined()) head.grad_tangent = rz * scale;
  return head;
}

}  // namespace

LossHead loss_head(LossKind kind, const at::Tensor& z, const at::Tensor& rz, const at::Tensor& y) {
  switch (kind) {
    case LossKind::kCrossEntropy:
      return cross_entropy(z, rz, y);
    case LossKind::kMeanSquaredError:
      return mean_squared_error(z, rz, y);
  }
  MAML_CHECK_ARG(false, "loss", "no loss head for ", loss_name(kind));
  return {};
}

}  // namespace maml_ext
