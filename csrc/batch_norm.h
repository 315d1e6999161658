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
#include "kernels/batch_norm_partials.h"

namespace maml_ext {

using OptionalTensor = std::optional<at::Tensor>;

// One tensor per channel, [batch, channels].
inline void check_channels(const OptionalTensor& t, const at::Tensor& x, int64_t batch,
                           const char* arg) {
  if (!given(t)) return;
  check_same_device_dtype(*t, x, arg);
  const int64_t channels = x.size(-1);
  MAML_CHECK_ARG(t->dim() == 2 && t->size(0) == batch && t->size(1) == channels, arg,
                 "expected one value per channel, shape [", batch, ", ", channels, "], got ",
                 t->sizes());
}

// x [B, M, C]: [B, C].
inline void check_per_channel(const OptionalTensor& t, const at::Tensor& x, const char* arg) {
  check_channels(t, x, x.size(0), arg);
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
  MAML_CHECK_ARG(!given(x_tangent) || (given(x_tangent_mean) && given(sigma_tangent)), "x_tangent",
                 "needs the forward's x_tangent_mean and sigma_tangent as well");
}

// Normalise + ReLU + 2×2 max-pool (stride 2, no padding), fused: x is images [N, H, W, C]
// (channels-last), statistics per channel over N·H·W, per-channel tensors [1, C].
inline void check_task_batch_norm_relu_max_pool_args(
    const at::Tensor& x, const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& bias, const OptionalTensor& weight_tangent,
    const OptionalTensor& bias_tangent, double eps, bool ceil_mode) {
  check_dim(x, 4, "x");
  check_floating(x, "x");
  MAML_CHECK_ARG(
      x.size(0) > 0 && x.size(1) >= (ceil_mode ? 1 : 2) && x.size(2) >= (ceil_mode ? 1 : 2), "x",
      "expected images [N, H, W, C] with N ≥ 1 and H, W ≥ ", ceil_mode ? 1 : 2, ", got shape ",
      x.sizes());
  check_like(x_tangent, x, "x_tangent");
  check_channels(weight, x, 1, "weight");
  check_channels(bias, x, 1, "bias");
  check_channels(weight_tangent, x, 1, "weight_tangent");
  check_channels(bias_tangent, x, 1, "bias_tangent");
  MAML_CHECK_ARG(eps >= 0, "eps", "expected a non-negative value, got ", eps);
}

inline void check_task_batch_norm_relu_max_pool_backward_args(
    const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent, const at::Tensor& x,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const at::Tensor& mean, const at::Tensor& invstd,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
    const at::Tensor& output, const at::Tensor& argmax) {
  check_dim(x, 4, "x");
  check_floating(x, "x");
  check_dim(output, 4, "output");
  check_same_device_dtype(output, x, "output");
  const int64_t h = x.size(1), w = x.size(2);
  MAML_CHECK_ARG(output.size(0) == x.size(0) && output.size(3) == x.size(3) &&
                     (output.size(1) == h / 2 || output.size(1) == (h + 1) / 2) &&
                     (output.size(2) == w / 2 || output.size(2) == (w + 1) / 2),
                 "output", "expected the pooled output of x ", x.sizes(), ", got shape ",
                 output.sizes());
  check_like(grad_y, output, "grad_y");
  check_like(grad_y_tangent, output, "grad_y_tangent");
  MAML_CHECK_ARG(argmax.scalar_type() == at::kByte && argmax.sizes() == output.sizes() &&
                     argmax.device() == x.device(),
                 "argmax", "expected the forward's uint8 argmax, shape ", output.sizes(), " on ",
                 x.device(), ", got ", argmax.scalar_type(), " ", argmax.sizes(), " on ",
                 argmax.device());
  check_like(x_tangent, x, "x_tangent");
  check_channels(weight, x, 1, "weight");
  check_channels(weight_tangent, x, 1, "weight_tangent");
  check_channels(mean, x, 1, "mean");
  check_channels(invstd, x, 1, "invstd");
  check_channels(x_tangent_mean, x, 1, "x_tangent_mean");
  check_channels(sigma_tangent, x, 1, "sigma_tangent");
  MAML_CHECK_ARG(!given(x_tangent) || (given(x_tangent_mean) && given(sigma_tangent)), "x_tangent",
                 "needs the forward's x_tangent_mean and sigma_tangent as well");
}

// Shared by the CPU and CUDA implementations.

// An optional tensor argument made contiguous; undefined where absent.
inline at::Tensor contiguous_or_undefined(const OptionalTensor& t) {
  return given(t) ? t->contiguous() : at::Tensor();
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// The outputs of a backward op: (grad_x, grad_x_tangent, grad_weight, grad_bias,
// grad_weight_tangent, grad_bias_tangent), empty where not computed.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_outputs(const at::Tensor& x, int64_t batch, int64_t channels, bool tangent,
                 bool input_grad) {
  const auto options = x.options();
  const auto empty = at::empty({0}, options);
  return {input_grad ? at::empty_like(x) : empty,
          input_grad && tangent ? at::empty_like(x) : empty,
          at::empty({batch, channels}, options),
          at::empty({batch, channels}, options),
          tangent ? at::empty({batch, channels}, options) : empty,
          tangent ? at::empty({batch, channels}, options) : empty};
}

// partial_statistics, where given, replaces the forward's statistics passes: [P, B, C, 5], the
// chunks' statistics of x (and x_tangent where given) per channel (kernels/batch_norm_partials.h),
// whose counts add up to M; task_conv2d_with_statistics produces them.
inline void check_partial_statistics(const OptionalTensor& partials, const at::Tensor& x,
                                     int64_t batch) {
  if (!given(partials)) return;
  check_same_device_dtype(*partials, x, "partial_statistics");
  MAML_CHECK_ARG(
      partials->dim() == 4 && partials->size(0) >= 1 && partials->size(1) == batch &&
          partials->size(2) == x.size(-1) && partials->size(3) == kernels::kPartialFields,
      "partial_statistics", "expected [P, ", batch, ", ", x.size(-1), ", ", kernels::kPartialFields,
      "] with P >= 1 (chunks, batch, channels, fields), got ", partials->sizes());
}

// Forward: (y, y_tangent, mean, invstd, x_tangent_mean, sigma_tangent). y_tangent is computed
// when x_tangent, weight_tangent or bias_tangent is given (else it is empty); x_tangent_mean
// (mean R{x}) and sigma_tangent (R{σ} = mean(x̂ R{x})) when x_tangent is given. relu: y is
// ReLU(batch norm), and y_tangent masked alike.
// Calls the op through the dispatcher, so the CPU or CUDA kernel runs by the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> task_batch_norm(
    const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& weight_tangent, const at::Tensor& bias_tangent,
    double eps, bool relu, const at::Tensor& partial_statistics = at::Tensor());

// Backward: (grad_x, grad_x_tangent, grad_weight, grad_bias, grad_weight_tangent,
// grad_bias_tangent). The tangents are computed when grad_y_tangent is given; relu_output (the
// forward's y) is given when the forward fused the ReLU; grad_x (and its tangent) only with
// input_grad. Parameter gradients are returned whether or not the layer has weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_tangent,
                         const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
                         const at::Tensor& weight_tangent, const at::Tensor& mean,
                         const at::Tensor& invstd, const at::Tensor& x_tangent_mean,
                         const at::Tensor& sigma_tangent, const at::Tensor& relu_output,
                         bool input_grad);

// Normalise + ReLU + 2×2 max-pool: (y, y_tangent, argmax, mean, invstd, x_tangent_mean,
// sigma_tangent), y [N, OH, OW, C] with OH = ⌊H/2⌋ (⌈H/2⌉ in ceil mode), argmax uint8 (2·dy + dx
// of the window's maximum), the rest as task_batch_norm's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool(const at::Tensor& x, const at::Tensor& x_tangent,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& weight_tangent, const at::Tensor& bias_tangent,
                              double eps, bool ceil_mode,
                              const at::Tensor& partial_statistics = at::Tensor());

// Its backward, as task_batch_norm_backward's, from the forward's output y and argmax.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_backward(const at::Tensor& grad_y, const at::Tensor& grad_y_tangent,
                                       const at::Tensor& x, const at::Tensor& x_tangent,
                                       const at::Tensor& weight, const at::Tensor& weight_tangent,
                                       const at::Tensor& mean, const at::Tensor& invstd,
                                       const at::Tensor& x_tangent_mean,
                                       const at::Tensor& sigma_tangent, const at::Tensor& output,
                                       const at::Tensor& argmax, bool input_grad);

}  // namespace maml_ext
