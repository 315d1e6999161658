// Tanh: y = tanh x, element-wise, on any activation shape (features or images). With
// s = 1 − y² = tanh'(x) and tanh''(x) = −2 y s:
//   R{y}  = s ⊙ R{x}
//   ∂x    = s ⊙ ∂y
//   R{∂x} = s ⊙ R{∂y} − 2 y ⊙ R{y} ⊙ ∂y
// (docs/tangent_rules.md; docs/adding_a_layer.md walks through this file.)
#include "layer.h"

namespace maml_ext {
namespace {

class Tanh final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    y_ = at::tanh(x);
    // tanh_backward(t, y) = t ⊙ (1 − y²)
    if (rx.defined()) rx = at::tanh_backward(rx, y_);
    ry_ = rx;
    x = y_;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    if (p.carries_tangent()) {
      at::Tensor rgx = rgy.defined() ? at::tanh_backward(rgy, y_) : at::zeros_like(gy);
      // An undefined R{y} (the input does not depend on θ) leaves only the first term.
      if (ry_.defined()) rgx.addcmul_(y_ * ry_, gy, -2);
      rgy = rgx;
    }
    gy = at::tanh_backward(gy, y_);
    y_ = ry_ = at::Tensor();
  }

 private:
  at::Tensor y_, ry_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const TanhRecord&) { return std::make_unique<Tanh>(); }

}  // namespace maml_ext
