// The implicit-product implementation of task_conv2d / task_conv2d_backward (contract:
// task_conv.h), host side: layouts, launch plans (kernels/conv_tiling.h), partial sums of split
// reductions. An Executor runs one product:
//   int64_t multiprocessors() const;
//   template <typename scalar_t, typename Problem>
//   void run(const Problem&, const kernels::GemmOperands<scalar_t>&, const kernels::GemmTiling&)
//   const;
// The CUDA executor launches the kernel (cuda/task_conv_cuda.cu); the CPU emulation
// (cpu/task_conv_emulation.cpp) walks the same tiles serially, so CPU tests check this file and
// the index math the kernel uses.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "kernels/batch_norm_partials.h"
#include "kernels/conv_tiling.h"
#include "kernels/task_conv_math.h"
#include "task_conv.h"

namespace maml_ext {
namespace task_conv_gemm {

// Weights [T, O, ...] whose per-task block is contiguous (no copy when it is: a stride of 0 over
// tasks stays, so shared weights are read in place).
inline at::Tensor per_task_contiguous(const at::Tensor& t) {
  return t.select(0, 0).is_contiguous() ? t : t.contiguous();
}

template <typename scalar_t>
const scalar_t* pointer(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

inline int64_t task_stride(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

inline void check_launch_limits(const kernels::GemmTiling& t) {
  MAML_CHECK_ARG(t.tasks * t.splits <= kernels::kMaxGridYZ, "x", "at most ", kernels::kMaxGridYZ,
                 " tasks are supported, got ", t.tasks);
  MAML_CHECK_ARG(t.grid_n <= kernels::kMaxGridYZ, "weight", "the convolution is too wide (", t.cols,
                 " columns per task) for one launch");
}

// The forward; with `statistics`, also the batch-norm partial statistics of y per row tile
// (kernels/task_gemm_tile.h's epilogue), [grid_m, T, O, kPartialFields], else an empty tensor.
template <typename Executor>
TaskConvStatisticsResult forward_impl(const Executor& executor, const at::Tensor& x_arg,
                                      const std::optional<at::Tensor>& x_tangent_arg,
                                      const at::Tensor& weight_arg,
                                      const std::optional<at::Tensor>& weight_tangent_arg,
                                      const std::optional<at::Tensor>& bias_arg,
                                      const std::optional<at::Tensor>& bias_tangent_arg,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      bool statistics) {
  const auto g = check_task_conv2d_args(x_arg, x_tangent_arg, weight_arg, weight_tangent_arg,
                                        bias_arg, bias_tangent_arg, stride, padding);
  const bool tangent = given(x_tangent_arg) || given(weight_tangent_arg) || given(bias_tangent_arg);
  const auto x = grouped_channels_last(x_arg);
  const auto rx = given(x_tangent_arg) ? grouped_channels_last(*x_tangent_arg) : at::Tensor();
  const auto w = per_task_contiguous(weight_arg);
  const auto v =
      given(weight_tangent_arg) ? per_task_contiguous(*weight_tangent_arg) : at::Tensor();
  const auto b = given(bias_arg) ? per_task_contiguous(*bias_arg) : at::Tensor();
  const auto vb = given(bias_tangent_arg) ? per_task_contiguous(*bias_tangent_arg) : at::Tensor();
  const auto options = x.options();
  auto y = empty_task_activation(g.batch, g.tasks, g.out_channels, g.out_h, g.out_w, options);
  auto ry = tangent
                ? empty_task_activation(g.batch, g.tasks, g.out_channels, g.out_h, g.out_w, options)
                : at::empty({0}, options);
  const auto tiling =
      kernels::plan_conv_pass(g, kernels::ConvPass::kForward, executor.multiprocessors());
  check_launch_limits(tiling);
  // The forward plan never splits the reduction, so each block's epilogue sees whole outputs.
  TORCH_INTERNAL_ASSERT(tiling.splits == 1, "maml_ext: the forward convolution was split");
  at::Tensor partials =
      statistics
          ? at::empty({tiling.grid_m, g.tasks, g.out_channels, kernels::kPartialFields}, options)
          : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_conv2d", [&] {
    kernels::GemmOperands<scalar_t> ops{};
    ops.a = pointer<scalar_t>(x);
    ops.a_tangent = pointer<scalar_t>(rx);
    ops.b = pointer<scalar_t>(w);
    ops.b_tangent = pointer<scalar_t>(v);
    ops.b_task_stride = task_stride(w);
    ops.b_tangent_task_stride = task_stride(v);
    ops.bias = pointer<scalar_t>(b);
    ops.bias_tangent = pointer<scalar_t>(vb);
    ops.bias_task_stride = task_stride(b);
    ops.bias_tangent_task_stride = task_stride(vb);
    ops.out = y.mutable_data_ptr<scalar_t>();
    ops.out_tangent = tangent ? ry.mutable_data_ptr<scalar_t>() : nullptr;
    ops.statistics = statistics ? partials.mutable_data_ptr<scalar_t>() : nullptr;
    executor.template run<scalar_t>(kernels::ForwardGemm{g}, ops, tiling);
  });
  return {y, ry, partials};
}

template <typename Executor>
TaskConvForwardResult forward(const Executor& executor, const at::Tensor& x,
                              const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
                              const std::optional<at::Tensor>& weight_tangent,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  auto [y, ry, unused] = forward_impl(executor, x, x_tangent, weight, weight_tangent, bias,
                                      bias_tangent, stride, padding, false);
  return {y, ry};
}

template <typename Executor>
TaskConvStatisticsResult forward_with_statistics(const Executor& executor, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& x_tangent,
                                                 const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& weight_tangent,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& bias_tangent,
                                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  return forward_impl(executor, x, x_tangent, weight, weight_tangent, bias, bias_tangent, stride,
                      padding, true);
}

template <typename Executor>
TaskConvBackwardResult backward(const Executor& executor, const at::Tensor& grad_y_arg,
                                const std::optional<at::Tensor>& grad_y_tangent_arg,
                                const at::Tensor& x_arg,
                                const std::optional<at::Tensor>& x_tangent_arg,
                                const at::Tensor& weight_arg,
                                const std::optional<at::Tensor>& weight_tangent_arg,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                bool need_input_grad, bool has_bias) {
  const auto g =
      check_task_conv2d_backward_args(grad_y_arg, grad_y_tangent_arg, x_arg, x_tangent_arg,
                                      weight_arg, weight_tangent_arg, stride, padding);
  const bool tangent =
      given(grad_y_tangent_arg) || given(x_tangent_arg) || given(weight_tangent_arg);
  const auto gy = grouped_channels_last(grad_y_arg);
  const auto rgy =
      given(grad_y_tangent_arg) ? grouped_channels_last(*grad_y_tangent_arg) : at::Tensor();
  const auto x = grouped_channels_last(x_arg);
  const auto rx = given(x_tangent_arg) ? grouped_channels_last(*x_tangent_arg) : at::Tensor();
  const auto w = per_task_contiguous(weight_arg);
  const auto v =
      given(weight_tangent_arg) ? per_task_contiguous(*weight_tangent_arg) : at::Tensor();
  const auto options = x.options();
  const auto empty = at::empty({0}, options);

  at::Tensor gx = empty, rgx = empty;
  if (need_input_grad) {
    gx = empty_task_activation(g.batch, g.tasks, g.in_channels, g.in_h, g.in_w, options);
    if (tangent)
      rgx = empty_task_activation(g.batch, g.tasks, g.in_channels, g.in_h, g.in_w, options);
    const auto tiling =
        kernels::plan_conv_pass(g, kernels::ConvPass::kBackwardData, executor.multiprocessors());
    check_launch_limits(tiling);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_conv2d_backward_data", [&] {
      kernels::GemmOperands<scalar_t> ops{};
      ops.a = pointer<scalar_t>(gy);
      ops.a_tangent = pointer<scalar_t>(rgy);
      ops.b = pointer<scalar_t>(w);
      ops.b_tangent = pointer<scalar_t>(v);
      ops.b_task_stride = task_stride(w);
      ops.b_tangent_task_stride = task_stride(v);
      ops.out = gx.mutable_data_ptr<scalar_t>();
      ops.out_tangent = tangent ? rgx.mutable_data_ptr<scalar_t>() : nullptr;
      executor.template run<scalar_t>(kernels::BackwardDataGemm{g}, ops, tiling);
    });
  }

  // Split reductions write partial sums [splits, T, O, C, kh, kw], added up afterwards.
  const auto tiling =
      kernels::plan_conv_pass(g, kernels::ConvPass::kWeightGrad, executor.multiprocessors());
  check_launch_limits(tiling);
  std::vector<int64_t> weight_sizes{tiling.splits, g.tasks,    g.out_channels,
                                    g.in_channels, g.kernel_h, g.kernel_w};
  auto gw = at::empty(weight_sizes, options);
  auto rgw = tangent ? at::empty(weight_sizes, options) : empty;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_conv2d_backward_weight", [&] {
    kernels::GemmOperands<scalar_t> ops{};
    ops.a = pointer<scalar_t>(gy);
    ops.a_tangent = pointer<scalar_t>(rgy);
    ops.b = pointer<scalar_t>(x);
    ops.b_tangent = pointer<scalar_t>(rx);
    ops.out = gw.mutable_data_ptr<scalar_t>();
    ops.out_tangent = tangent ? rgw.mutable_data_ptr<scalar_t>() : nullptr;
    ops.split_stride = gw[0].numel();
    executor.template run<scalar_t>(kernels::WeightGradGemm{g}, ops, tiling);
  });
  gw = tiling.splits == 1 ? gw.select(0, 0) : gw.sum(0);
  if (tangent) rgw = tiling.splits == 1 ? rgw.select(0, 0) : rgw.sum(0);

  at::Tensor gb = empty, rgb = empty;
  if (has_bias) {
    gb = grad_y_arg.sum({0, 3, 4});
    if (tangent) rgb = rgy.defined() ? grad_y_tangent_arg->sum({0, 3, 4}) : at::zeros_like(gb);
  }
  return {gx, rgx, gw, rgw, gb, rgb};
}

}  // namespace task_conv_gemm
}  // namespace maml_ext
