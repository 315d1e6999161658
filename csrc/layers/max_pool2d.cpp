// MaxPool2d on sample-major images [N, T, C, H, W] (layer.h): one ATen max-pool over the T·C
// channels; the tangent follows the same argmax.
#include <array>
#include <vector>

#include "../checks.h"
#include "layer.h"

namespace maml_ext {
namespace {

class MaxPool2d final : public Layer {
 public:
  explicit MaxPool2d(const MaxPool2dRecord& r)
      : kernel_{r.kernel_h, r.kernel_w},
        stride_{r.stride_h, r.stride_w},
        padding_{r.padding_h, r.padding_w},
        ceil_mode_(r.ceil_mode) {}

  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 5, "x", "MaxPool2d expects image inputs [T, N, C, H, W], got ",
                   x.sizes());
    input_ = channels_last(grouped(x));
    auto [y, indices] =
        at::max_pool2d_with_indices(input_, kernel_, stride_, padding_, {1, 1}, ceil_mode_);
    indices_ = indices;
    output_sizes_ = {x.size(0), x.size(1), x.size(2), y.size(2), y.size(3)};
    if (rx.defined()) {
      // R{y} = R{x}[argmax]
      rx = grouped(rx).flatten(2).gather(2, indices_.flatten(2)).reshape(output_sizes_);
    }
    x = y.view(output_sizes_);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    // R{∂x} = R{∂y} scattered to the argmax, as ∂x is.
    const std::vector<int64_t> input_sizes{output_sizes_[0], output_sizes_[1], output_sizes_[2],
                                           input_.size(2), input_.size(3)};
    gy = scatter(gy).view(input_sizes);
    if (p.carries_tangent() && rgy.defined()) rgy = scatter(rgy).view(input_sizes);
    input_ = indices_ = at::Tensor();
  }

 private:
  at::Tensor scatter(const at::Tensor& g) const {
    return at::max_pool2d_with_indices_backward(channels_last(grouped(g)), input_, kernel_, stride_,
                                                padding_, {1, 1}, ceil_mode_, indices_);
  }

  std::array<int64_t, 2> kernel_, stride_, padding_;
  bool ceil_mode_;
  std::vector<int64_t> output_sizes_;
  at::Tensor input_, indices_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const MaxPool2dRecord& record) {
  return std::make_unique<MaxPool2d>(record);
}

}  // namespace maml_ext
