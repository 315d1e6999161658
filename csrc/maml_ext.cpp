// The library's op schemas, in one place. Kernels are registered per dispatch key in cpu/ and cuda/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "softmax_cross_entropy.h"
#include "task_conv.h"

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

namespace {
std::optional<at::Tensor> optional_arg(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
}  // namespace

TaskConvForwardResult task_conv2d(const at::Tensor& x, const at::Tensor& x_tangent,
                                  const at::Tensor& weight, const at::Tensor& weight_tangent,
                                  const at::Tensor& bias, const at::Tensor& bias_tangent,
                                  at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("maml_ext::task_conv2d", "")
          .typed<TaskConvForwardResult(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(x, optional_arg(x_tangent), weight, optional_arg(weight_tangent), optional_arg(bias),
                 optional_arg(bias_tangent), stride, padding);
}

TaskConvBackwardResult task_conv2d_backward(const at::Tensor& grad_y,
                                            const at::Tensor& grad_y_tangent, const at::Tensor& x,
                                            const at::Tensor& x_tangent, const at::Tensor& weight,
                                            const at::Tensor& weight_tangent,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            bool need_input_grad, bool has_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("maml_ext::task_conv2d_backward", "")
          .typed<TaskConvBackwardResult(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const std::optional<at::Tensor>&, const at::Tensor&,
              const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, bool, bool)>();
  return op.call(grad_y, optional_arg(grad_y_tangent), x, optional_arg(x_tangent), weight,
                 optional_arg(weight_tangent), stride, padding, need_input_grad, has_bias);
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
  // Task-batched 2-d convolution with fused tangents; layouts and results: csrc/task_conv.h.
  m.def(
      "task_conv2d(Tensor x, Tensor? x_tangent, Tensor weight, Tensor? weight_tangent, "
      "Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding) -> "
      "(Tensor y, Tensor y_tangent)");
  m.def(
      "task_conv2d_backward(Tensor grad_y, Tensor? grad_y_tangent, Tensor x, Tensor? x_tangent, "
      "Tensor weight, Tensor? weight_tangent, int[2] stride, int[2] padding, bool need_input_grad, "
      "bool has_bias) -> (Tensor grad_x, Tensor grad_x_tangent, Tensor grad_weight, "
      "Tensor grad_weight_tangent, Tensor grad_bias, Tensor grad_bias_tangent)");
  // CPU test hooks of the CUDA kernels (cpu/task_conv_emulation.cpp): the CUDA implementation's
  // host side and index math run serially on the CPU, with a given multiprocessor count.
  m.def(
      "_task_conv2d_emulated(Tensor x, Tensor? x_tangent, Tensor weight, Tensor? weight_tangent, "
      "Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding, int multiprocessors) -> "
      "(Tensor y, Tensor y_tangent)");
  m.def(
      "_task_conv2d_backward_emulated(Tensor grad_y, Tensor? grad_y_tangent, Tensor x, "
      "Tensor? x_tangent, Tensor weight, Tensor? weight_tangent, int[2] stride, int[2] padding, "
      "bool need_input_grad, bool has_bias, int multiprocessors) -> (Tensor grad_x, "
      "Tensor grad_x_tangent, Tensor grad_weight, Tensor grad_weight_tangent, Tensor grad_bias, "
      "Tensor grad_bias_tangent)");
  // The CUDA launch plan of one pass (0 forward, 1 backward data, 2 weight gradient) from
  // [pass, N, T, C, H, W, O, kh, kw, stride_h, stride_w, pad_h, pad_w, multiprocessors], and how
  // often its grid writes each output element / reads each reduction index (kernels/conv_tiling.h).
  m.def("_task_conv2d_launch_config(int[] shape_args) -> int[]", &task_conv2d_launch_config);
  m.def("_task_conv2d_tile_coverage(int[] shape_args) -> (Tensor writes, Tensor reads)",
        &task_conv2d_tile_coverage);
}

}  // namespace maml_ext
