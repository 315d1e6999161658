// The library's op schemas, all in this file: the public ops in the maml_ext namespace and the
// test hooks in maml_ext_testing (so torch.ops.maml_ext lists only what users call). Kernels are
// registered per dispatch key next to their implementations: CompositeExplicitAutograd in
// meta_step.cpp and meta_gradient.cpp, Autograd in meta_step_autograd.cpp and meta_gradient.cpp,
// CPU in cpu/, CUDA in cuda/. Also here: the C++ entry points (batch_norm.h, task_conv.h,
// softmax_cross_entropy.h, task_loss.h) that call the kernel ops through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "batch_norm.h"
#include "cpu/vector_isa.h"
#include "kernels/batch_norm_plan.h"
#include "program_records.h"
#include "softmax_cross_entropy.h"
#include "task_conv.h"
#include "task_loss.h"

namespace maml_ext {

bool compiled_with_cuda() {
#ifdef MAML_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The C++ signatures of the kernel ops' schemas (below), as their CPU and CUDA kernels implement
// them; declarations only, for the dispatcher's typed handles.
namespace schema {
using Tensor = at::Tensor;
std::tuple<Tensor, Tensor, Tensor, Tensor> softmax_cross_entropy(
    const Tensor& logits, const Tensor& target, const OptionalTensor& logits_tangent);
TaskLossResult task_loss(const Tensor& z, const OptionalTensor& z_tangent, const Tensor& y,
                         int64_t loss);
TaskConvForwardResult task_conv2d(const Tensor& x, const OptionalTensor& x_tangent,
                                  const Tensor& weight, const OptionalTensor& weight_tangent,
                                  const OptionalTensor& bias, const OptionalTensor& bias_tangent,
                                  at::IntArrayRef stride, at::IntArrayRef padding);
TaskConvStatisticsResult task_conv2d_with_statistics(
    const Tensor& x, const OptionalTensor& x_tangent, const Tensor& weight,
    const OptionalTensor& weight_tangent, const OptionalTensor& bias,
    const OptionalTensor& bias_tangent, at::IntArrayRef stride, at::IntArrayRef padding);
TaskConvBackwardResult task_conv2d_backward(const Tensor& grad_y,
                                            const OptionalTensor& grad_y_tangent, const Tensor& x,
                                            const OptionalTensor& x_tangent, const Tensor& weight,
                                            const OptionalTensor& weight_tangent,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            bool need_input_grad, bool has_bias);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> task_batch_norm(
    const Tensor& x, const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& bias, const OptionalTensor& weight_tangent,
    const OptionalTensor& bias_tangent, double eps, bool relu,
    const OptionalTensor& partial_statistics);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> task_batch_norm_backward(
    const Tensor& grad_y, const OptionalTensor& grad_y_tangent, const Tensor& x,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const Tensor& mean, const Tensor& invstd,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
    const OptionalTensor& relu_output, bool input_grad);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> task_batch_norm_relu_max_pool(
    const Tensor& x, const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& bias, const OptionalTensor& weight_tangent,
    const OptionalTensor& bias_tangent, double eps, bool ceil_mode,
    const OptionalTensor& partial_statistics);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> task_batch_norm_relu_max_pool_backward(
    const Tensor& grad_y, const OptionalTensor& grad_y_tangent, const Tensor& x,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const Tensor& mean, const Tensor& invstd,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent, const Tensor& output,
    const Tensor& argmax, bool input_grad);
}  // namespace schema

namespace {

// The dispatcher's handle of op `name`, typed by the C++ signature `Signature`.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// An undefined tensor is the schema's None.
OptionalTensor optional_arg(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// The CUDA batch-norm reduction's launch shape, for the CPU tests of the launch logic.
std::vector<int64_t> task_batch_norm_reduction_plan(int64_t batch, int64_t rows, int64_t channels,
                                                    int64_t multiprocessors) {
  MAML_CHECK_ARG(batch >= 1 && batch <= kernels::kMaxGridYZ, "batch", "expected 1 to ",
                 kernels::kMaxGridYZ, ", got ", batch);
  MAML_CHECK_ARG(rows >= 1, "rows", "expected at least 1, got ", rows);
  MAML_CHECK_ARG(channels >= 1, "channels", "expected at least 1, got ", channels);
  MAML_CHECK_ARG(multiprocessors >= 1, "multiprocessors", "expected at least 1, got ",
                 multiprocessors);
  const auto p = kernels::plan_channel_reduction(batch, rows, channels, multiprocessors);
  return {p.channels_per_block, p.row_lanes, p.channel_blocks, p.splits, p.rows_per_split};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& logits_tangent) {
  static const auto op =
      find_op<decltype(schema::softmax_cross_entropy)>("maml_ext::softmax_cross_entropy");
  return op.call(logits, target, optional_arg(logits_tangent));
}

TaskLossResult task_loss(const at::Tensor& z, const at::Tensor& z_tangent, const at::Tensor& y,
                         LossKind kind) {
  static const auto op = find_op<decltype(schema::task_loss)>("maml_ext::task_loss");
  return op.call(z, optional_arg(z_tangent), y, static_cast<int64_t>(kind));
}

TaskConvForwardResult task_conv2d(const at::Tensor& x, const at::Tensor& x_tangent,
                                  const at::Tensor& weight, const at::Tensor& weight_tangent,
                                  const at::Tensor& bias, const at::Tensor& bias_tangent,
                                  at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op = find_op<decltype(schema::task_conv2d)>("maml_ext::task_conv2d");
  return op.call(x, optional_arg(x_tangent), weight, optional_arg(weight_tangent),
                 optional_arg(bias), optional_arg(bias_tangent), stride, padding);
}

TaskConvStatisticsResult task_conv2d_with_statistics(
    const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
    const at::Tensor& weight_tangent, const at::Tensor& bias, const at::Tensor& bias_tangent,
    at::IntArrayRef stride, at::IntArrayRef padding) {
  static const auto op = find_op<decltype(schema::task_conv2d_with_statistics)>(
      "maml_ext::task_conv2d_with_statistics");
  return op.call(x, optional_arg(x_tangent), weight, optional_arg(weight_tangent),
                 optional_arg(bias), optional_arg(bias_tangent), stride, padding);
}

TaskConvBackwardResult task_conv2d_backward(const at::Tensor& grad_y,
                                            const at::Tensor& grad_y_tangent, const at::Tensor& x,
                                            const at::Tensor& x_tangent, const at::Tensor& weight,
                                            const at::Tensor& weight_tangent,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            bool need_input_grad, bool has_bias) {
  static const auto op =
      find_op<decltype(schema::task_conv2d_backward)>("maml_ext::task_conv2d_backward");
  return op.call(grad_y, optional_arg(grad_y_tangent), x, optional_arg(x_tangent), weight,
                 optional_arg(weight_tangent), stride, padding, need_input_grad, has_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> task_batch_norm(
    const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& weight_tangent, const at::Tensor& bias_tangent,
    double eps, bool relu, const at::Tensor& partial_statistics) {
  static const auto op = find_op<decltype(schema::task_batch_norm)>("maml_ext::task_batch_norm");
  return op.call(x, optional_arg(x_tangent), optional_arg(weight), optional_arg(bias),
                 optional_arg(weight_tangent), optional_arg(bias_tangent), eps, relu,
                 optional_arg(partial_statistics));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_tangent,
                         const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
                         const at::Tensor& weight_tangent, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& x_tangent_mean,
                         const at::Tensor& sigma_tangent, const at::Tensor& relu_output,
                         bool input_grad) {
  static const auto op =
      find_op<decltype(schema::task_batch_norm_backward)>("maml_ext::task_batch_norm_backward");
  return op.call(grad_y, optional_arg(grad_y_tangent), x, optional_arg(x_tangent),
                 optional_arg(weight), optional_arg(weight_tangent), mean, invstd,
                 optional_arg(x_tangent_mean), optional_arg(sigma_tangent),
                 optional_arg(relu_output), input_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool(const at::Tensor& x, const at::Tensor& x_tangent,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& weight_tangent, const at::Tensor& bias_tangent,
                              double eps, bool ceil_mode, const at::Tensor& partial_statistics) {
  static const auto op = find_op<decltype(schema::task_batch_norm_relu_max_pool)>(
      "maml_ext::task_batch_norm_relu_max_pool");
  return op.call(x, optional_arg(x_tangent), optional_arg(weight), optional_arg(bias),
                 optional_arg(weight_tangent), optional_arg(bias_tangent), eps, ceil_mode,
                 optional_arg(partial_statistics));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_tangent,
                                       const at::Tensor& x, const at::Tensor& x_tangent,
                                       const at::Tensor& weight, const at::Tensor& weight_tangent,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const at::Tensor& x_tangent_mean,
                                       const at::Tensor& sigma_tangent, const at::Tensor& output,
                                       const at::Tensor& argmax, bool input_grad) {
  static const auto op = find_op<decltype(schema::task_batch_norm_relu_max_pool_backward)>(
      "maml_ext::task_batch_norm_relu_max_pool_backward");
  return op.call(grad_y, optional_arg(grad_y_tangent), x, optional_arg(x_tangent),
                 optional_arg(weight), optional_arg(weight_tangent), mean, invstd,
                 optional_arg(x_tangent_mean), optional_arg(sigma_tangent), output, argmax,
                 input_grad);
}

TORCH_LIBRARY(maml_ext, m) {
  // The layer program (int[] program, float[] program_floats) is maml_ext/program.py's record
  // format, defined in csrc/program_records.h; loss is a loss code from the same header
  // (program.loss_code("cross_entropy") or ("mse") in Python). program_format() returns the format
  // as JSON, which program.py checks its own table against at import.
  m.def("program_format() -> str", &program_format);
  // The fused meta-step of all tasks (csrc/meta_step.h). Differentiable: mean_query_loss (the mean
  // of query_loss over tasks) has the gradients meta_grad (theta) and inner_lr_grad (inner_lr); the
  // other outputs are not differentiable. inner_lr_grad is [0] unless asked for.
  m.def(
      "meta_step(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order, bool inner_lr_grad) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad, Tensor mean_query_loss)");
  // meta_step with the MAML family's options (csrc/meta_step.h): query_weights [K] (multi-step
  // loss), inner_shift [K, P] (a constant added to each inner step's weights: per-step batch-norm
  // parameters). Not differentiable; its gradients are those of objective.
  m.def(
      "meta_step_options(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order, bool inner_lr_grad, Tensor? query_weights=None, "
      "Tensor? inner_shift=None) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad, Tensor inner_shift_grad, Tensor objective)");
  // ANIL's meta-step with the frozen body's features computed once (csrc/meta_step.h): theta is
  // the body's parameters then the head's; inner_lr the head's rates [K, P_head]. Not
  // differentiable; its gradients are those of objective (the mean query loss).
  m.def(
      "frozen_body_meta_step(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] body_program, float[] body_floats, "
      "int[] head_program, float[] head_floats, int loss, bool first_order, bool inner_lr_grad) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad, Tensor inner_shift_grad, Tensor objective)");
  // MetaOptimizer's fixed-rate step: meta_step at the concatenated params (in the program's slot
  // order), its meta-gradient split into params' shapes, the means over tasks (accuracy [0] for
  // MSE) and whether the loss and gradient are all finite (0-d bool); csrc/meta_gradient.h.
  m.def(
      "meta_gradient(Tensor[] params, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order) -> "
      "(Tensor[] grads, Tensor query_loss, Tensor query_accuracy, Tensor support_loss, "
      "Tensor finite)");
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
  // The per-task losses at a program's outputs z [T, N, ...] against y (class indices [T, N] or
  // targets shaped like z): loss [T], accuracy [T] or [0], ∂L_t/∂z and, given z_tangent, its
  // tangent; contract in csrc/task_loss.h, definitions in csrc/kernels/loss_math.h.
  m.def(
      "task_loss(Tensor z, Tensor? z_tangent, Tensor y, int loss) -> "
      "(Tensor loss, Tensor accuracy, Tensor grad, Tensor grad_tangent)");
  // Transductive batch norm (statistics per channel of x [B, M, C] over its M values), optionally
  // with a fused ReLU, carrying tangents; contract in csrc/batch_norm.h. partial_statistics
  // [P, B, C, 5] (e.g. from task_conv2d_with_statistics) replaces the statistics passes.
  m.def(
      "task_batch_norm(Tensor x, Tensor? x_tangent, Tensor? weight, Tensor? bias, "
      "Tensor? weight_tangent, Tensor? bias_tangent, float eps, bool relu, "
      "Tensor? partial_statistics=None) -> "
      "(Tensor y, Tensor y_tangent, Tensor mean, Tensor invstd, Tensor x_tangent_mean, "
      "Tensor sigma_tangent)");
  m.def(
      "task_batch_norm_backward(Tensor grad_y, Tensor? grad_y_tangent, Tensor x, "
      "Tensor? x_tangent, Tensor? weight, Tensor? weight_tangent, Tensor mean, Tensor invstd, "
      "Tensor? x_tangent_mean, Tensor? sigma_tangent, Tensor? relu_output, bool input_grad) -> "
      "(Tensor grad_x, Tensor grad_x_tangent, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_weight_tangent, Tensor grad_bias_tangent)");
  // Batch norm + ReLU + 2×2 max-pool (stride 2) fused, on images x [N, H, W, C] (channels-last);
  // contract in csrc/batch_norm.h.
  m.def(
      "task_batch_norm_relu_max_pool(Tensor x, Tensor? x_tangent, Tensor? weight, Tensor? bias, "
      "Tensor? weight_tangent, Tensor? bias_tangent, float eps, bool ceil_mode, "
      "Tensor? partial_statistics=None) -> "
      "(Tensor y, Tensor y_tangent, Tensor argmax, Tensor mean, Tensor invstd, "
      "Tensor x_tangent_mean, Tensor sigma_tangent)");
  m.def(
      "task_batch_norm_relu_max_pool_backward(Tensor grad_y, Tensor? grad_y_tangent, Tensor x, "
      "Tensor? x_tangent, Tensor? weight, Tensor? weight_tangent, Tensor mean, Tensor invstd, "
      "Tensor? x_tangent_mean, Tensor? sigma_tangent, Tensor output, Tensor argmax, "
      "bool input_grad) -> "
      "(Tensor grad_x, Tensor grad_x_tangent, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_weight_tangent, Tensor grad_bias_tangent)");
  // Task-batched 2-d convolution with fused tangents; layouts and results: csrc/task_conv.h.
  m.def(
      "task_conv2d(Tensor x, Tensor? x_tangent, Tensor weight, Tensor? weight_tangent, "
      "Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding) -> "
      "(Tensor y, Tensor y_tangent)");
  // task_conv2d plus the batch-norm partial statistics of y [P, T, O, 5] (csrc/task_conv.h), for
  // a following task_batch_norm.
  m.def(
      "task_conv2d_with_statistics(Tensor x, Tensor? x_tangent, Tensor weight, "
      "Tensor? weight_tangent, Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding) "
      "-> (Tensor y, Tensor y_tangent, Tensor partial_statistics)");
  m.def(
      "task_conv2d_backward(Tensor grad_y, Tensor? grad_y_tangent, Tensor x, Tensor? x_tangent, "
      "Tensor weight, Tensor? weight_tangent, int[2] stride, int[2] padding, bool need_input_grad, "
      "bool has_bias) -> (Tensor grad_x, Tensor grad_x_tangent, Tensor grad_weight, "
      "Tensor grad_weight_tangent, Tensor grad_bias, Tensor grad_bias_tangent)");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
}

// Test hooks: internals the tests check directly. Not part of the API.
TORCH_LIBRARY(maml_ext_testing, m) {
  // meta_step's CPU path for small MLPs (cpu/mlp_meta_step.cpp), which meta_step takes by itself
  // where it applies; callable directly so that tests know which path they check.
  m.def(
      "_mlp_meta_step(Tensor theta, Tensor inner_lr, Tensor support_x, Tensor support_y, "
      "Tensor query_x, Tensor query_y, int[] program, float[] program_floats, int loss, "
      "bool first_order, bool inner_lr_grad) -> "
      "(Tensor query_loss, Tensor query_accuracy, Tensor support_loss, Tensor meta_grad, "
      "Tensor inner_lr_grad, Tensor mean_query_loss)");
  // Makes the CPU kernels compiled for two instruction sets run their baseline versions (true) or
  // the CPU's own again (false); returns the previous setting (cpu/vector_isa.h).
  m.def("_force_baseline_cpu_kernels(bool force) -> bool", &cpu::force_baseline_kernels);
  // (channels_per_block, row_lanes, channel_blocks, splits, rows_per_split): see
  // csrc/kernels/batch_norm_plan.h.
  m.def(
      "task_batch_norm_reduction_plan(int batch, int rows, int channels, int multiprocessors) -> "
      "int[]",
      &task_batch_norm_reduction_plan);
  // The CUDA convolution kernels run on the CPU (cpu/task_conv_emulation.cpp): the CUDA
  // implementation's host side and index math run serially, with a given multiprocessor count.
  m.def(
      "_task_conv2d_emulated(Tensor x, Tensor? x_tangent, Tensor weight, Tensor? weight_tangent, "
      "Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding, int multiprocessors) -> "
      "(Tensor y, Tensor y_tangent)");
  m.def(
      "_task_conv2d_with_statistics_emulated(Tensor x, Tensor? x_tangent, Tensor weight, "
      "Tensor? weight_tangent, Tensor? bias, Tensor? bias_tangent, int[2] stride, int[2] padding, "
      "int multiprocessors) -> (Tensor y, Tensor y_tangent, Tensor partial_statistics)");
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
