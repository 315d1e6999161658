// maml_ext::task_batch_norm and task_batch_norm_backward: the transductive batch norm (batch
// statistics per channel) with an optional fused ReLU, each pass carrying a tangent.
//
// Layout: x is [B, M, C], statistics per (b, c) over the M values x[b, :, c]. The fused program's
// images [N, T, C, H, W] stored channels-last (memory N, H, W, T, C) are B = 1, M = N·H·W and T·C
// channels; its features [T, N, C] are B = T, M = N, C channels. Per-channel tensors (weights,
// statistics, parameter gradients) are [B, C].
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"

namespace maml_ext {

using OptionalTensor = std::optional<at::Tensor>;

inline bool given(const OptionalTensor& t) { return t.has_value() && t->defined(); }

inline void check_like(const OptionalTensor& t, const at::Tensor& like, const char* arg) {
  if (!given(t)) return;
  check_same_device_dtype(*t, like, arg);
  MAML_CHECK_ARG(t->sizes() == like.sizes(), arg, "expected shape ", like.sizes(), ", got ",
                 t->sizes());
}

// One tensor per channel, [B, C] where x is [B, M, C].
inline void check_per_channel(const OptionalTensor& t, const at::Tensor& x, const char* arg) {
  if (!given(t)) return;
  check_same_device_dtype(*t, x, arg);
  MAML_CHECK_ARG(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2), arg,
                 "expected one value per channel, shape [", x.size(0), ", ", x.size(2), "], got ",
                 t->sizes());
}

inline void check_batch_norm_input(const at::Tensor& x, const char* arg) {
  check_dim(x, 3, arg);
  check_floating(x, arg);
  MAML_CHECK_ARG(x.size(1) > 0, arg, "expected at least one value per channel, got shape ",
                 x.sizes());
}

inline void check_task_batch_norm_args(const at::Tensor& x, const OptionalTensor& x_tangent,
                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& weight_tangent,
                                       const OptionalTensor& bias_tangent, double eps) {
  check_batch_norm_input(x, "x");
  check_like(x_tangent, x, "x_tangent");
  check_per_channel(weight, x, "weight");
  check_per_channel(bias, x, "bias");
  check_per_channel(weight_tangent, x, "weight_tangent");
  check_per_channel(bias_tangent, x, "bias_tangent");
  MAML_CHECK_ARG(eps >= 0, "eps", "expected a non-negative value, got ", eps);
}

inline void check_task_batch_norm_backward_args(
    const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent, const at::Tensor& x,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const at::Tensor& mean, const at::Tensor& invstd,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
    const OptionalTensor& relu_output) {
  check_batch_norm_input(x, "x");
  check_like(grad_y, x, "grad_y");
  check_like(grad_y_tangent, x, "grad_y_tangent");
  check_like(x_tangent, x, "x_tangent");
  check_like(relu_output, x, "relu_output");
  check_per_channel(weight, x, "weight");
  check_per_channel(weight_tangent, x, "weight_tangent");
  check_per_channel(mean, x, "mean");
  check_per_channel(invstd, x, "invstd");
  check_per_channel(x_tangent_mean, x, "x_tangent_mean");
  check_per_channel(sigma_tangent, x, "sigma_tangent");
  MAML_CHECK_ARG(!given(x_tangent) || (given(x_tangent_mean) && given(sigma_tangent)),
                 "x_tangent", "needs the forward's x_tangent_mean and sigma_tangent as well");
}

// Forward: (y, y_tangent, mean, invstd, x_tangent_mean, sigma_tangent). y_tangent is computed
// when x_tangent, weight_tangent or bias_tangent is given (else it is empty); x_tangent_mean
// (mean R{x}) and sigma_tangent (R{σ} = mean(x̂ R{x})) when x_tangent is given. relu: y is
// ReLU(batch norm), and y_tangent masked alike.
// Calls the op through the dispatcher, so the CPU or CUDA kernel runs by the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm(const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
                const at::Tensor& bias, const at::Tensor& weight_tangent,
                const at::Tensor& bias_tangent, double eps, bool relu);

// Backward: (grad_x, grad_x_tangent, grad_weight, grad_bias, grad_weight_tangent,
// grad_bias_tangent). The tangents are computed when grad_y_tangent is given; relu_output (the
// forward's y) is given when the forward fused the ReLU; grad_x (and its tangent) only with
// input_grad. Parameter gradients are returned whether or not the layer has weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_tangent,
                         const at::Tensor& x, const at::Tensor& x_tangent,
                         const at::Tensor& weight, const at::Tensor& weight_tangent,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& x_tangent_mean, const at::Tensor& sigma_tangent,
                         const at::Tensor& relu_output, bool input_grad);

}  // namespace maml_ext
