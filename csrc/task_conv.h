// maml_ext::task_conv2d and task_conv2d_backward: T per-task 2-d convolutions (zero padding, no
// dilation) computed together, each with its tangent (docs/tangent_rules.md, Conv2d).
//
// Contract (every implementation: ATen on CPU, the implicit-product kernels on CUDA):
//   x, x_tangent        [N, T, C, H, W]; any strides. Results come back in the layer layout: the
//                       grouped view [N, T·C, H, W] channels-last (memory order N, H, W, T, C).
//   weight, w_tangent   [T, O, C, kh, kw]: task t's weights; the stride over T may be 0 (shared).
//   bias, b_tangent     [T, O].
//   task_conv2d         y = conv(x, W) + b                              [N, T, O, Ho, Wo]
//                       y_tangent = conv(R{x}, W) + conv(x, V) + v_b    (when any tangent is given)
//   task_conv2d_backward, from grad_y [N, T, O, Ho, Wo]:
//                       grad_x = conv_input_grad(gy, W)                 (need_input_grad)
//                       grad_weight = conv_weight_grad(x, gy)           [T, O, C, kh, kw]
//                       grad_bias = Σ_{n,h,w} gy                        [T, O] (has_bias)
//                       and, when any of grad_y_tangent, x_tangent, weight_tangent is given, the
//                       tangents R{gx} = conv_input_grad(R{gy}, W) + conv_input_grad(gy, V),
//                       R{gW} = conv_weight_grad(x, R{gy}) + conv_weight_grad(R{x}, gy),
//                       R{gb} = Σ R{gy}.
//   task_conv2d_with_statistics: task_conv2d's results and the batch-norm partial statistics of y
//                       (and y_tangent, zero where there is none), partial_statistics
//                       [P, T, O, 5]: per chunk p of the rows (n, ho, wo), per (task, channel),
//                       the fields of kernels/batch_norm_partials.h. Viewed as [P, 1, T·O, 5] they
//                       are task_batch_norm's partial_statistics for y as [1, N·Ho·Wo, T·O]. The
//                       chunks are the CUDA kernel's row tiles; on the CPU, kStatisticsChunkRows
//                       rows each.
// An absent tangent is zero. Results that are not computed are empty tensors (shape [0]).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "kernels/task_conv_math.h"

namespace maml_ext {

using TaskConvForwardResult = std::tuple<at::Tensor, at::Tensor>;
using TaskConvStatisticsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kStatisticsChunkRows = 64;
using TaskConvBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_pair(at::IntArrayRef values, const char* arg, int64_t least) {
  MAML_CHECK_ARG(values.size() == 2, arg, "expected 2 values, got ", values.size());
  MAML_CHECK_ARG(values[0] >= least && values[1] >= least, arg, "expected values >= ", least,
                 ", got ", values);
}

// Checks the arguments shared by both ops and returns the convolution's geometry.
inline kernels::ConvGeometry check_task_conv2d_geometry(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  check_dim(x, 5, "x");
  check_floating(x, "x");
  MAML_CHECK_ARG(x.numel() > 0, "x", "expected a non-empty [N, T, C, H, W] tensor, got shape ",
                 x.sizes());
  check_dim(weight, 5, "weight");
  check_same_device_dtype(weight, x, "weight");
  MAML_CHECK_ARG(weight.size(0) == x.size(1) && weight.size(2) == x.size(2) && weight.numel() > 0,
                 "weight", "expected [T, O, C, kh, kw] with T = ", x.size(1),
                 " and C = ", x.size(2), " (from x), got shape ", weight.sizes());
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  kernels::ConvGeometry g{};
  g.batch = x.size(0);
  g.tasks = x.size(1);
  g.in_channels = x.size(2);
  g.in_h = x.size(3);
  g.in_w = x.size(4);
  g.out_channels = weight.size(1);
  g.kernel_h = weight.size(3);
  g.kernel_w = weight.size(4);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  MAML_CHECK_ARG(g.in_h + 2 * g.pad_h >= g.kernel_h && g.in_w + 2 * g.pad_w >= g.kernel_w, "x",
                 "the padded input ", g.in_h + 2 * g.pad_h, "x", g.in_w + 2 * g.pad_w,
                 " is smaller than the kernel ", g.kernel_h, "x", g.kernel_w);
  g.out_h = kernels::conv_output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h);
  g.out_w = kernels::conv_output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w);
  check_like(x_tangent, x, "x_tangent");
  check_like(weight_tangent, weight, "weight_tangent");
  return g;
}

inline kernels::ConvGeometry check_task_conv2d_args(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const auto g = check_task_conv2d_geometry(x, x_tangent, weight, weight_tangent, stride, padding);
  if (given(bias)) {
    check_same_device_dtype(*bias, x, "bias");
    MAML_CHECK_ARG(bias->dim() == 2 && bias->size(0) == g.tasks && bias->size(1) == g.out_channels,
                   "bias", "expected [T, O] = [", g.tasks, ", ", g.out_channels, "], got shape ",
                   bias->sizes());
  }
  MAML_CHECK_ARG(!given(bias_tangent) || given(bias), "bias_tangent", "given without a bias");
  if (given(bias)) check_like(bias_tangent, *bias, "bias_tangent");
  return g;
}

inline kernels::ConvGeometry check_task_conv2d_backward_args(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_y_tangent, const at::Tensor& x,
    const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const auto g = check_task_conv2d_geometry(x, x_tangent, weight, weight_tangent, stride, padding);
  check_same_device_dtype(grad_y, x, "grad_y");
  const std::vector<int64_t> expected{g.batch, g.tasks, g.out_channels, g.out_h, g.out_w};
  MAML_CHECK_ARG(grad_y.sizes() == at::IntArrayRef(expected), "grad_y",
                 "expected the output's shape [N, T, O, Ho, Wo] = ", expected, ", got ",
                 grad_y.sizes());
  check_like(grad_y_tangent, grad_y, "grad_y_tangent");
  return g;
}

// The layer-layout storage of an [N, T, C, H, W] activation: its grouped view [N, T·C, H, W],
// channels-last contiguous (no copy when it already is).
inline at::Tensor grouped_channels_last(const at::Tensor& x) {
  return x.reshape({x.size(0), x.size(1) * x.size(2), x.size(3), x.size(4)})
      .contiguous(at::MemoryFormat::ChannelsLast);
}

// A new activation [N, T, C, H, W] in the layer layout.
inline at::Tensor empty_task_activation(int64_t n, int64_t tasks, int64_t channels, int64_t h,
                                        int64_t w, const at::TensorOptions& options) {
  return at::empty({n, tasks * channels, h, w},
                   options.memory_format(at::MemoryFormat::ChannelsLast))
      .view({n, tasks, channels, h, w});
}

// Call the ops through the dispatcher (CPU or CUDA kernel by the tensors' device). Undefined
// tensors are absent optional arguments.
TaskConvForwardResult task_conv2d(const at::Tensor& x, const at::Tensor& x_tangent,
                                  const at::Tensor& weight, const at::Tensor& weight_tangent,
                                  const at::Tensor& bias, const at::Tensor& bias_tangent,
                                  at::IntArrayRef stride, at::IntArrayRef padding);

TaskConvStatisticsResult task_conv2d_with_statistics(
    const at::Tensor& x, const at::Tensor& x_tangent, const at::Tensor& weight,
    const at::Tensor& weight_tangent, const at::Tensor& bias, const at::Tensor& bias_tangent,
    at::IntArrayRef stride, at::IntArrayRef padding);

TaskConvBackwardResult task_conv2d_backward(const at::Tensor& grad_y,
                                            const at::Tensor& grad_y_tangent, const at::Tensor& x,
                                            const at::Tensor& x_tangent, const at::Tensor& weight,
                                            const at::Tensor& weight_tangent,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            bool need_input_grad, bool has_bias);

// The launch plan and its coverage, for the CPU tests (cpu/task_conv_emulation.cpp).
std::vector<int64_t> task_conv2d_launch_config(at::IntArrayRef shape_args);
std::tuple<at::Tensor, at::Tensor> task_conv2d_tile_coverage(at::IntArrayRef shape_args);

}  // namespace maml_ext
