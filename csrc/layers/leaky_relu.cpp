// LeakyReLU: y = x where x > 0, a·x elsewhere (a = negative_slope), element-wise on any activation
// shape. Its derivative s is piecewise constant (1 or a, by the sign of x), so like ReLU's mask it
// does not move along the tangent:
//   R{y}  = s ⊙ R{x}
//   ∂x    = s ⊙ ∂y
//   R{∂x} = s ⊙ R{∂y}
// (docs/tangent_rules.md). The slope at exactly 0 is a, as in PyTorch.
#include "layer.h"

namespace maml_ext {
namespace {

class LeakyReLU final : public Layer {
 public:
  explicit LeakyReLU(const LeakyReLURecord& r)
      : slope_(r.negative_slope), from_output_(r.negative_slope >= 0) {}

  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    at::Tensor y = at::leaky_relu(x, slope_);
    // With a ≥ 0, y > 0 exactly where x > 0, so the output (which the next layer usually keeps
    // anyway) tells the slope; a negative a flips the sign of y, so the input is kept instead.
    sign_source_ = from_output_ ? y : x;
    if (rx.defined()) rx = times_slope(rx);
    x = y;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = times_slope(gy);
    if (p.carries_tangent() && rgy.defined()) rgy = times_slope(rgy);
    sign_source_ = at::Tensor();
  }

 private:
  // t ⊙ s: t where the saved sign is positive, a·t elsewhere.
  at::Tensor times_slope(const at::Tensor& t) const {
    return at::leaky_relu_backward(t, sign_source_, slope_, from_output_);
  }

  double slope_;
  bool from_output_;
  at::Tensor sign_source_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const LeakyReLURecord& record) {
  return std::make_unique<LeakyReLU>(record);
}

}  // namespace maml_ext
