// Linear: y = x Wᵀ + b per task, with W [out, in] and b [out] slices of θ.
#include "../checks.h"
#include "layer.h"

namespace maml_ext {
namespace {

class Linear final : public Layer {
 public:
  explicit Linear(const LinearRecord& r) : r_(r) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == r_.in_features, "x",
                   "Linear expects task-batched inputs [T, N, ", r_.in_features, "], got shape ",
                   x.sizes());
    x_ = x;
    rx_ = rx;
    const auto w = weight(p.theta);
    at::Tensor y = times_weight_transposed(x, w);
    if (r_.has_bias) y.add_(bias(p.theta).unsqueeze(1));
    if (p.carries_tangent()) {
      // R{y} = R{x} Wᵀ + x Vᵀ + v_b
      at::Tensor ry = at::bmm(x, weight(p.tangent).transpose(1, 2));
      if (rx.defined()) ry.add_(times_weight_transposed(rx, w));
      if (r_.has_bias) ry.add_(bias(p.tangent).unsqueeze(1));
      rx = ry;
    }
    x = y;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const auto gy_t = gy.transpose(1, 2);
    write_param(p.grad, r_.weight_offset, at::bmm(gy_t, x_));
    if (r_.has_bias) write_param(p.grad, r_.bias_offset, gy.sum(1));
    const auto w = weight(p.theta);
    at::Tensor gx = need_input_grad ? times_weight(gy, w) : at::Tensor();
    if (p.carries_tangent()) {
      // R{gW} = R{gy}ᵀ x + gyᵀ R{x};  R{gb} = Σ R{gy};  R{gx} = R{gy} W + gy V
      if (!rgy.defined()) rgy = at::zeros_like(gy);
      at::Tensor rgw = at::bmm(rgy.transpose(1, 2), x_);
      if (rx_.defined()) rgw.baddbmm_(gy_t, rx_);
      write_param(p.grad_tangent, r_.weight_offset, rgw);
      if (r_.has_bias) write_param(p.grad_tangent, r_.bias_offset, rgy.sum(1));
      if (need_input_grad) rgy = times_weight(rgy, w).baddbmm_(gy, weight(p.tangent));
    }
    gy = gx;
    x_ = rx_ = at::Tensor();
  }

 private:
  at::Tensor weight(const at::Tensor& flat) const {
    return param_view(flat, r_.weight_offset, {r_.out_features, r_.in_features});
  }

  at::Tensor bias(const at::Tensor& flat) const {
    return param_view(flat, r_.bias_offset, {r_.out_features});
  }

  // x Wᵀ per task; one large matrix product where all tasks share W.
  static at::Tensor times_weight_transposed(const at::Tensor& x, const at::Tensor& weight) {
    if (shared_across_tasks(weight)) {
      const auto flat = x.reshape({-1, x.size(2)});
      return at::mm(flat, weight.select(0, 0).t()).view({x.size(0), x.size(1), weight.size(1)});
    }
    return at::bmm(x, weight.transpose(1, 2));
  }

  static at::Tensor times_weight(const at::Tensor& g, const at::Tensor& weight) {
    if (shared_across_tasks(weight)) {
      const auto flat = g.reshape({-1, g.size(2)});
      return at::mm(flat, weight.select(0, 0)).view({g.size(0), g.size(1), weight.size(2)});
    }
    return at::bmm(g, weight);
  }

  LinearRecord r_;
  at::Tensor x_, rx_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const LinearRecord& record) {
  return std::make_unique<Linear>(record);
}

}  // namespace maml_ext
