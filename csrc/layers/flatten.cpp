// Flatten (start_dim 1): images [N, T, C, H, W] (sample-major, layer.h) become task-major features
// [T, N, C·H·W]; features [T, N, ...] become [T, N, numel].
#include <vector>

#include "layer.h"

namespace maml_ext {
namespace {

class Flatten final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    input_sizes_ = x.sizes().vec();
    x = flatten(x);
    if (rx.defined()) rx = flatten(rx);
  }

  void backward(const PassParams&, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = unflatten(gy);
    if (rgy.defined()) rgy = unflatten(rgy);
  }

 private:
  at::Tensor flatten(const at::Tensor& x) const {
    if (x.dim() == 5) return x.transpose(0, 1).reshape({x.size(1), x.size(0), -1});
    return x.reshape({x.size(0), x.size(1), -1});
  }

  at::Tensor unflatten(const at::Tensor& g) const {
    if (input_sizes_.size() == 5) {
      return g
          .view(
              {input_sizes_[1], input_sizes_[0], input_sizes_[2], input_sizes_[3], input_sizes_[4]})
          .transpose(0, 1)
          .contiguous();
    }
    return g.reshape(input_sizes_);
  }

  std::vector<int64_t> input_sizes_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const FlattenRecord&) { return std::make_unique<Flatten>(); }

}  // namespace maml_ext
