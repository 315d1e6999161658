// ReLU: y = max(x, 0); the tangent and both gradients pass where y > 0.
#include "layer.h"

namespace maml_ext {
namespace {

class ReLU final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    y_ = at::relu(x);
    // threshold_backward(t, y, 0) keeps t where y > 0: the ReLU mask, without storing one.
    if (rx.defined()) rx = at::threshold_backward(rx, y_, 0);
    x = y_;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = at::threshold_backward(gy, y_, 0);
    if (p.carries_tangent() && rgy.defined()) rgy = at::threshold_backward(rgy, y_, 0);
    y_ = at::Tensor();
  }

 private:
  at::Tensor y_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const ReLURecord&) { return std::make_unique<ReLU>(); }

}  // namespace maml_ext
