// Transductive batch norm: each task's own batch statistics, per channel. The ReLU that follows it,
// and on CUDA a 2×2 max-pool after that, run in its epilogue (absorb). All tasks' channels are one
// maml_ext::task_batch_norm (or task_batch_norm_relu_max_pool) call (csrc/batch_norm.h; CPU and
// CUDA kernels), which carries the tangent through forward and backward (docs/tangent_rules.md).
// Images [N, T, C, H, W], stored N, H, W, T·C, are its x [1, N·H·W, T·C] (pooled: [N, H, W, T·C])
// without a copy; features [T, N, C] are its x [T, N, C]. On CUDA, right after a convolution, its
// statistics come from the convolution's epilogue (partial statistics merged per channel) instead
// of two passes over x.
#include <memory>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "../batch_norm.h"
#include "../checks.h"
#include "layer.h"

namespace maml_ext {
namespace {

class BatchNorm final : public Layer {
 public:
  explicit BatchNorm(const BatchNormRecord& r) : r_(r) {}

  // A ReLU right after the batch norm runs in its epilogue; so does a max-pool after that ReLU
  // where the fused kernel covers it: 2×2 windows, stride 2, no padding. CUDA tensors then run the
  // fused kernel; CPU tensors run ATen's pool after this layer's own epilogue (there the fused
  // kernel measured slower).
  bool absorb(const LayerRecord& next) override {
    if (std::holds_alternative<ReLURecord>(next) && !relu_) {
      relu_ = true;
      return true;
    }
    const auto* pool = std::get_if<MaxPool2dRecord>(&next);
    if (pool == nullptr || !r_.spatial || !relu_ || pool_ != nullptr) return false;
    const bool two_by_two = pool->kernel_h == 2 && pool->kernel_w == 2 && pool->stride_h == 2 &&
                            pool->stride_w == 2 && pool->padding_h == 0 && pool->padding_w == 0;
    if (!two_by_two) return false;
    pool_ = make_layer(*pool);
    ceil_mode_ = pool->ceil_mode;
    return true;
  }

  // Where the convolution before this layer leaves its output's partial statistics for the next
  // forward (consumed there).
  at::Tensor* input_statistics_slot(int64_t channels) override {
    return r_.spatial && channels == r_.channels ? &partial_statistics_ : nullptr;
  }

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    const int64_t channels = r_.channels;
    if (r_.spatial) {
      MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == channels, "x", "BatchNorm2d expects inputs with ",
                     channels, " channels [T, N, ", channels,
                     ", H, W], got [N, T, C, H, W] = ", x.sizes());
    } else {
      MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == channels, "x",
                     "BatchNorm1d expects inputs [T, N, ", channels, "], got ", x.sizes());
    }
    input_sizes_ = x.sizes().vec();
    tasks_ = r_.spatial ? x.size(1) : x.size(0);
    fused_pool_ = pool_ != nullptr && x.is_cuda();
    x_ = to_kernel(x);
    rx_ = rx.defined() ? to_kernel(rx) : at::Tensor();
    const bool tangent = p.carries_tangent();
    const auto weight = channel_param(p.theta, r_.weight_offset);
    const auto bias = channel_param(p.theta, r_.bias_offset);
    const auto weight_tangent = tangent ? channel_param(p.tangent, r_.weight_offset) : at::Tensor();
    const auto bias_tangent = tangent ? channel_param(p.tangent, r_.bias_offset) : at::Tensor();
    at::Tensor y, ry, rx_mean, r_sigma;
    const auto partials = std::exchange(partial_statistics_, at::Tensor());
    if (fused_pool_) {
      std::tie(y, ry, argmax_, mean_, invstd_, rx_mean, r_sigma) = task_batch_norm_relu_max_pool(
          x_, rx_, weight, bias, weight_tangent, bias_tangent, r_.eps, ceil_mode_, partials);
      output_sizes_ = {input_sizes_[0], input_sizes_[1], input_sizes_[2], y.size(1), y.size(2)};
    } else {
      std::tie(y, ry, mean_, invstd_, rx_mean, r_sigma) = task_batch_norm(
          x_, rx_, weight, bias, weight_tangent, bias_tangent, r_.eps, relu_, partials);
      output_sizes_ = input_sizes_;
    }
    rx_mean_ = rx_.defined() ? rx_mean : at::Tensor();
    r_sigma_ = rx_.defined() ? r_sigma : at::Tensor();
    y_ = relu_ ? y : at::Tensor();  // the fused ReLU's mask (and the pool's output), for backward
    rx = rx_.defined() || (tangent && r_.affine) ? from_kernel(ry, output_sizes_) : at::Tensor();
    x = from_kernel(y, output_sizes_);
    if (pool_ != nullptr && !fused_pool_) pool_->forward(p, x, rx);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    if (pool_ != nullptr && !fused_pool_) pool_->backward(p, gy, rgy, true);
    const bool tangent = p.carries_tangent();
    const auto gyk = to_kernel(gy);
    at::Tensor rgyk;
    if (tangent) rgyk = rgy.defined() ? to_kernel(rgy) : at::zeros_like(gyk);
    const auto weight = channel_param(p.theta, r_.weight_offset);
    const auto weight_tangent = tangent ? channel_param(p.tangent, r_.weight_offset) : at::Tensor();
    auto [gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent] =
        fused_pool_ ? task_batch_norm_relu_max_pool_backward(
                          gyk, rgyk, x_, rx_, weight, weight_tangent, mean_, invstd_, rx_mean_,
                          r_sigma_, y_, argmax_, need_input_grad)
                    : task_batch_norm_backward(gyk, rgyk, x_, rx_, weight, weight_tangent, mean_,
                                               invstd_, rx_mean_, r_sigma_, y_, need_input_grad);
    if (r_.affine) {
      write_param(p.grad, r_.weight_offset, grad_weight);
      write_param(p.grad, r_.bias_offset, grad_bias);
      if (tangent) {
        write_param(p.grad_tangent, r_.weight_offset, grad_weight_tangent);
        write_param(p.grad_tangent, r_.bias_offset, grad_bias_tangent);
      }
    }
    gy = need_input_grad ? from_kernel(gx, input_sizes_) : at::Tensor();
    rgy = need_input_grad && tangent ? from_kernel(rgx, input_sizes_) : at::Tensor();
    x_ = rx_ = mean_ = invstd_ = rx_mean_ = r_sigma_ = y_ = argmax_ = at::Tensor();
  }

 private:
  // [T, C] parameters as the kernel's [B, C]: [1, T·C] for images, [T, C] for features.
  // Undefined without affine (γ = 1, β = 0).
  at::Tensor channel_param(const at::Tensor& flat, int64_t offset) const {
    if (!r_.affine) return at::Tensor();
    const auto param = param_view(flat, offset, {r_.channels}).expand({tasks_, r_.channels});
    return r_.spatial ? param.reshape({1, tasks_ * r_.channels}) : param;
  }

  // Images [N, T, C, H, W] as the kernels' [N, H, W, T·C] (fused pool) or [1, N·H·W, T·C].
  at::Tensor to_kernel(const at::Tensor& t) const {
    if (!r_.spatial) return t;
    const auto images = grouped(t).permute({0, 2, 3, 1});
    return fused_pool_ ? images : images.reshape({1, -1, images.size(3)});
  }

  // The kernels' output back as [N, T, C, H, W] of `sizes`.
  at::Tensor from_kernel(const at::Tensor& k, const std::vector<int64_t>& sizes) const {
    if (!r_.spatial) return k;
    return k.view({sizes[0], sizes[3], sizes[4], sizes[1] * sizes[2]})
        .permute({0, 3, 1, 2})
        .view(sizes);
  }

  BatchNormRecord r_;
  bool relu_ = false, ceil_mode_ = false, fused_pool_ = false;
  std::unique_ptr<Layer> pool_;  // the max-pool taken over, if any
  int64_t tasks_ = 0;
  std::vector<int64_t> input_sizes_, output_sizes_;
  at::Tensor x_, rx_, mean_, invstd_, rx_mean_, r_sigma_, y_, argmax_;
  at::Tensor partial_statistics_;  // from the convolution before, for one forward
};

}  // namespace

std::unique_ptr<Layer> make_layer(const BatchNormRecord& record) {
  return std::make_unique<BatchNorm>(record);
}

}  // namespace maml_ext
