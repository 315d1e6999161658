// CPU kernels of maml_ext::task_conv2d / task_conv2d_backward (contract: ../task_conv.h).
//
// Viewed as [N, T·C, H, W], the T per-task convolutions are one grouped convolution (groups = T),
// a native ATen (oneDNN) kernel. Activations are channels-last, the format oneDNN computes in:
// measured on the Omniglot shapes, NCHW cost a reorder per call. task_conv2d_with_statistics
// adds the batch-norm partial statistics of the output in a pass over it.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../kernels/batch_norm_partials.h"
#include "../task_conv.h"

namespace maml_ext {
namespace {

struct GroupedConv {
  int64_t tasks;
  at::IntArrayRef stride, padding;

  // The per-task [T, O, ...] parameters as one [T·O, ...] tensor (a copy only where the tasks'
  // slices are not adjacent, e.g. all tasks sharing the weights).
  static at::Tensor stacked(const at::Tensor& param) {
    std::vector<int64_t> sizes(param.sizes().begin() + 1, param.sizes().end());
    sizes[0] *= param.size(0);
    return param.reshape(sizes);
  }

  // [N, T·C, H, W] as [N, T, C, H, W] in the layer layout. oneDNN returns channels-last except
  // where the format is ambiguous (e.g. 1x1 maps); only there does this copy.
  at::Tensor ungrouped(const at::Tensor& g) const {
    return g.contiguous(at::MemoryFormat::ChannelsLast)
        .view({g.size(0), tasks, g.size(1) / tasks, g.size(2), g.size(3)});
  }

  // The grouped channels-last view oneDNN receives. With one channel in all ([N, 1, H, W], the
  // first layer of a grayscale net run one task at a time) channels-last and contiguous strides
  // coincide and ATen normalises them to contiguous, so oneDNN would compute and return NCHW, and
  // the result and gradient would each cost a reorder (measured: two [75, 64, 28, 28] copies per
  // task in the Omniglot query pass); the channel's stride is marked channels-last explicitly.
  static at::Tensor onednn_input(const at::Tensor& x) {
    const auto g = grouped_channels_last(x);
    if (g.size(1) != 1) return g;
    return g.as_strided(g.sizes(), {g.stride(0), 1, g.stride(2), g.stride(3)});
  }

  // x: [N, T, C, H, W]; weight stacked [T·O, C, kh, kw]; bias stacked [T·O] or undefined.
  at::Tensor convolve(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) const {
    return ungrouped(at::convolution(onednn_input(x), weight, bias, stride, padding, {1, 1}, false,
                                     {0, 0}, tasks));
  }

  // gy, x: grouped channels-last; weight stacked.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          std::array<bool, 3> mask) const {
    const int64_t bias_size = weight.size(0);
    return at::convolution_backward(gy, x, weight,
                                    mask[2]
                                        ? at::OptionalIntArrayRef(at::IntArrayRef(&bias_size, 1))
                                        : at::OptionalIntArrayRef(),
                                    stride, padding, {1, 1}, false, {0, 0}, tasks, mask);
  }
};

TaskConvForwardResult task_conv2d_cpu(const at::Tensor& x,
                                      const std::optional<at::Tensor>& x_tangent,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& weight_tangent,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& bias_tangent,
                                      at::IntArrayRef stride, at::IntArrayRef padding) {
  check_task_conv2d_args(x, x_tangent, weight, weight_tangent, bias, bias_tangent, stride, padding);
  const GroupedConv conv{x.size(1), stride, padding};
  const auto w = GroupedConv::stacked(weight);
  const auto y = conv.convolve(x, w, given(bias) ? GroupedConv::stacked(*bias) : at::Tensor());
  if (!given(x_tangent) && !given(weight_tangent) && !given(bias_tangent)) {
    return {y, at::empty({0}, y.options())};
  }
  // R{y} = conv(x, V) + v_b + conv(R{x}, W)
  const auto vb = given(bias_tangent) ? GroupedConv::stacked(*bias_tangent) : at::Tensor();
  at::Tensor ry;
  if (given(weight_tangent)) ry = conv.convolve(x, GroupedConv::stacked(*weight_tangent), vb);
  if (given(x_tangent)) {
    if (ry.defined()) {
      ry.add_(conv.convolve(*x_tangent, w, at::Tensor()));
    } else {
      ry = conv.convolve(*x_tangent, w, given(weight_tangent) ? at::Tensor() : vb);
    }
  }
  if (!ry.defined()) ry = at::zeros_like(y).add_(bias_tangent->reshape({1, x.size(1), -1, 1, 1}));
  return {y, ry};
}

// Partial batch-norm statistics of y (and ry, where defined) [rows, channels] (the layer layout
// seen as N·Ho·Wo rows of T·O channels) over chunks of kStatisticsChunkRows rows, each chunk's
// values added in row order with the CUDA epilogue's per-value update (batch_norm_partials.h).
template <typename scalar_t>
void chunk_statistics(const scalar_t* y, const scalar_t* ry, int64_t rows, int64_t channels,
                      scalar_t* partials) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t chunks = (rows + kStatisticsChunkRows - 1) / kStatisticsChunkRows;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<kernels::PartialStats<acc_t>> s(channels);
    for (int64_t p = begin; p < end; ++p) {
      std::fill(s.begin(), s.end(), kernels::empty_partial<acc_t>());
      const int64_t stop = std::min(rows, (p + 1) * kStatisticsChunkRows);
      for (int64_t m = p * kStatisticsChunkRows; m < stop; ++m) {
        for (int64_t k = 0; k < channels; ++k) {
          kernels::add_value(s[k], y[m * channels + k],
                             ry != nullptr ? ry[m * channels + k] : scalar_t(0));
        }
      }
      for (int64_t k = 0; k < channels; ++k) {
        kernels::store_partial(s[k], partials + (p * channels + k) * kernels::kPartialFields);
      }
    }
  });
}

TaskConvStatisticsResult task_conv2d_with_statistics_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  auto [y, ry] =
      task_conv2d_cpu(x, x_tangent, weight, weight_tangent, bias, bias_tangent, stride, padding);
  const int64_t tasks = y.size(1), out = y.size(2);
  const int64_t rows = y.size(0) * y.size(3) * y.size(4);
  const auto values = grouped_channels_last(y);
  const auto tangents = ry.numel() > 0 ? grouped_channels_last(ry) : at::Tensor();
  const int64_t chunks = (rows + kStatisticsChunkRows - 1) / kStatisticsChunkRows;
  auto partials = at::empty({chunks, tasks, out, kernels::kPartialFields}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "task_conv2d_with_statistics_cpu", [&] {
    chunk_statistics<scalar_t>(values.const_data_ptr<scalar_t>(),
                               tangents.defined() ? tangents.const_data_ptr<scalar_t>() : nullptr,
                               rows, tasks * out, partials.mutable_data_ptr<scalar_t>());
  });
  return {y, ry, partials};
}

TaskConvBackwardResult task_conv2d_backward_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_y_tangent, const at::Tensor& x,
    const std::optional<at::Tensor>& x_tangent, const at::Tensor& weight,
    const std::optional<at::Tensor>& weight_tangent, at::IntArrayRef stride,
    at::IntArrayRef padding, bool need_input_grad, bool has_bias) {
  check_task_conv2d_backward_args(grad_y, grad_y_tangent, x, x_tangent, weight, weight_tangent,
                                  stride, padding);
  const GroupedConv conv{x.size(1), stride, padding};
  const auto w = GroupedConv::stacked(weight);
  const auto gy = grouped_channels_last(grad_y);
  const auto xg = GroupedConv::onednn_input(x);
  const auto empty = at::empty({0}, x.options());
  auto [gx, gw, gb] = conv.backward(gy, xg, w, {need_input_grad, true, has_bias});
  const auto weight_shape = weight.sizes();
  const std::array<int64_t, 2> bias_shape{weight.size(0), weight.size(1)};
  gx = need_input_grad ? conv.ungrouped(gx) : empty;
  gw = gw.view(weight_shape);
  gb = has_bias ? gb.view(bias_shape) : empty;
  if (!given(grad_y_tangent) && !given(x_tangent) && !given(weight_tangent)) {
    return {gx, empty, gw, empty, gb, empty};
  }
  // R{gx} = conv_input_grad(R{gy}, W) + conv_input_grad(gy, V)
  // R{gW} = conv_weight_grad(x, R{gy}) + conv_weight_grad(R{x}, gy);  R{gb} = Σ R{gy}
  at::Tensor rgx, rgw, rgb;
  if (given(grad_y_tangent)) {
    std::tie(rgx, rgw, rgb) = conv.backward(grouped_channels_last(*grad_y_tangent), xg, w,
                                            {need_input_grad, true, has_bias});
  }
  const bool input_term = need_input_grad && given(weight_tangent);
  const bool weight_term = given(x_tangent);
  if (input_term || weight_term) {
    // The weight gradient reads only the weight's shape: W stands in for an absent V.
    auto [rgx_v, rgw_rx, unused] =
        conv.backward(gy, weight_term ? GroupedConv::onednn_input(*x_tangent) : xg,
                      given(weight_tangent) ? GroupedConv::stacked(*weight_tangent) : w,
                      {input_term, weight_term, false});
    if (input_term) rgx = rgx.defined() ? rgx.add_(rgx_v) : rgx_v;
    if (weight_term) rgw = rgw.defined() ? rgw.add_(rgw_rx) : rgw_rx;
  }
  if (need_input_grad) {
    rgx = rgx.defined() ? conv.ungrouped(rgx) : at::zeros_like(gx);
  } else {
    rgx = empty;
  }
  rgw = rgw.defined() ? rgw.view(weight_shape) : at::zeros_like(gw);
  if (has_bias) {
    rgb = rgb.defined() ? rgb.view(bias_shape) : at::zeros_like(gb);
  } else {
    rgb = empty;
  }
  return {gx, rgx, gw, rgw, gb, rgb};
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) {
  m.impl("task_conv2d", &task_conv2d_cpu);
  m.impl("task_conv2d_with_statistics", &task_conv2d_with_statistics_cpu);
  m.impl("task_conv2d_backward", &task_conv2d_backward_cpu);
}

}  // namespace maml_ext
