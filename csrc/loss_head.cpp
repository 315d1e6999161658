#include "loss_head.h"

#include "checks.h"
#include "task_loss.h"

namespace maml_ext {

LossHead loss_head(LossKind kind, const at::Tensor& z, const at::Tensor& rz, const at::Tensor& y) {
  if (has_class_targets(kind)) {
    MAML_CHECK_ARG(z.dim() == 3, "model", "cross-entropy needs outputs [T, N, classes], got ",
                   z.sizes());
  }
  auto [loss, accuracy, grad, grad_tangent] = task_loss(z, rz, y, kind);
  LossHead head;
  head.loss = loss;
  if (has_class_targets(kind)) head.accuracy = accuracy;
  head.grad = grad;
  if (rz.defined()) head.grad_tangent = grad_tangent;
  return head;
}

}  // namespace maml_ext
