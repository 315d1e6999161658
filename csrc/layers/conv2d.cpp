// Conv2d: the T per-task convolutions are one op, maml_ext::task_conv2d (csrc/task_conv.h): a
// grouped ATen convolution on the CPU, the fused implicit-product kernels on CUDA. Inputs are
// sample-major images [N, T, C, H, W] stored channels-last (layer.h).
#include <array>
#include <tuple>

#include "../checks.h"
#include "../task_conv.h"
#include "layer.h"

namespace maml_ext {
namespace {

class Conv2d final : public Layer {
 public:
  explicit Conv2d(const Conv2dRecord& r)
      : r_(r), stride_{r.stride_h, r.stride_w}, padding_{r.padding_h, r.padding_w} {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == r_.in_channels, "x", "Conv2d expects inputs with ",
                   r_.in_channels, " channels [T, N, ", r_.in_channels,
                   ", H, W], got [N, T, C, H, W] = ", x.sizes());
    x_ = x;
    rx_ = rx;
    const bool tangent = p.carries_tangent();
    // R{y} = conv(R{x}, W) + conv(x, V) + v_b
    const auto w = weights(p.theta), v = tangent ? weights(p.tangent) : at::Tensor();
    const auto b = bias(p.theta), vb = tangent ? bias(p.tangent) : at::Tensor();
    at::Tensor y, ry;
    if (statistics_slot_ != nullptr && x.is_cuda()) {
      // The kernel's epilogue summarises y for the batch norm that follows: [P, T, O, 5] as its
      // [P, 1, T·O, 5].
      at::Tensor partials;
      std::tie(y, ry, partials) =
          task_conv2d_with_statistics(x, rx, w, v, b, vb, stride_, padding_);
      *statistics_slot_ = partials.view({partials.size(0), 1, -1, partials.size(3)});
    } else {
      std::tie(y, ry) = task_conv2d(x, rx, w, v, b, vb, stride_, padding_);
    }
    if (tangent) rx = ry;
    x = y;
  }

  // A spatial batch norm directly after this layer takes its statistics from this layer's epilogue
  // on CUDA (the CPU keeps oneDNN's convolution and the batch norm's own passes).
  void link(Layer& next) override {
    statistics_slot_ = next.input_statistics_slot(r_.out_channels);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const bool tangent = p.carries_tangent();
    // R{gx} = conv_input_grad(R{gy}, W) + conv_input_grad(gy, V)
    // R{gW} = conv_weight_grad(x, R{gy}) + conv_weight_grad(R{x}, gy);  R{gb} = Σ R{gy}
    auto [gx, rgx, gw, rgw, gb, rgb] =
        task_conv2d_backward(gy, tangent ? rgy : at::Tensor(), x_, rx_, weights(p.theta),
                             tangent ? weights(p.tangent) : at::Tensor(), stride_, padding_,
                             need_input_grad, r_.has_bias);
    write_param(p.grad, r_.weight_offset, gw);
    if (r_.has_bias) write_param(p.grad, r_.bias_offset, gb);
    if (tangent) {
      write_param(p.grad_tangent, r_.weight_offset, rgw);
      if (r_.has_bias) write_param(p.grad_tangent, r_.bias_offset, rgb);
      rgy = need_input_grad ? rgx : at::Tensor();
    }
    gy = need_input_grad ? gx : at::Tensor();
    x_ = rx_ = at::Tensor();
  }

 private:
  at::Tensor weights(const at::Tensor& flat) const {
    return param_view(flat, r_.weight_offset,
                      {r_.out_channels, r_.in_channels, r_.kernel_h, r_.kernel_w});
  }

  at::Tensor bias(const at::Tensor& flat) const {
    return r_.has_bias ? param_view(flat, r_.bias_offset, {r_.out_channels}) : at::Tensor();
  }

  Conv2dRecord r_;
  std::array<int64_t, 2> stride_, padding_;
  at::Tensor x_, rx_;
  at::Tensor* statistics_slot_ = nullptr;  // the following batch norm's, if it takes them
};

}  // namespace

std::unique_ptr<Layer> make_layer(const Conv2dRecord& record) {
  return std::make_unique<Conv2d>(record);
}

}  // namespace maml_ext
