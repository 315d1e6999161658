// The library's op schemas, in one place. Kernels are registered per dispatch key in cpu/ and cuda/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "softmax_cross_entropy.h"

namespace maml_ext {

bool compiled_with_cuda() {
#ifdef MAML_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& logits_tangent) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("maml_ext::softmax_cross_entropy", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(logits, target,
                 logits_tangent.defined() ? std::optional<at::Tensor>(logits_tangent) : std::nullopt);
}

TORCH_LIBRARY(maml_ext, m) {
  // Program description: see csrc/layers.h (LayerKind) and maml_ext/program.py, which writes it.
  // loss: 1 softmax cross-entropy, 2 mean-squared error.
  m.def(
      "meta_step(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order, bool inner_lr_grad) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad)");
  // meta_step's CPU path for small MLPs (cpu/mlp_meta_step.cpp), which meta_step takes by itself
  // where it applies; callable directly so that tests know which path they check.
  m.def(
      "_mlp_meta_step(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order, bool inner_lr_grad) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad)");
  m.def(
      "adapt(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, int[] program, "
      "float[] program_floats, int loss) -> Tensor");
  m.def("program_forward(Tensor theta, Tensor x, int[] program, float[] program_floats) -> Tensor");
  m.def(
      "loss_hvp(Tensor theta, Tensor x, Tensor y, Tensor v, int[] program, float[] program_floats, "
      "int loss) -> (Tensor loss, Tensor grad, Tensor hvp)");
  // Rows of logits [R, C] with class targets [R]: per-row loss, correctness (0/1), the gradient
  // p − onehot (not divided by R) and, given logits_tangent, its tangent.
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? logits_tangent) -> "
      "(Tensor loss, Tensor correct, Tensor grad, Tensor grad_tangent)");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
}

}  // namespace maml_ext
