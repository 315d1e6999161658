// AppendLogStd: y = [x | s] on features x [T, N, A], with s [A] a per-task parameter repeated for
// every sample: a Gaussian policy's state-independent log-std beside its means, the outputs
// [T, N, 2A] that the gaussian_nll loss reads. y is linear in (x, s) with no product between them,
// so no curvature enters here (docs/tangent_rules.md):
//   R{y}  = [R{x} | v_s]
//   ∂x    = ∂y[..., :A],       ∂s = Σ_n ∂y[n, A:]
//   R{∂x} = R{∂y}[..., :A],    R{∂s} = Σ_n R{∂y}[n, A:]
#include "layer.h"

#include "../checks.h"

namespace maml_ext {
namespace {

class AppendLogStd final : public Layer {
 public:
  explicit AppendLogStd(const AppendLogStdRecord& record) : record_(record) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    const int64_t features = record_.features;
    MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == features, "model",
                   "append_log_std expects features [T, N, ", features, "], got ", x.sizes());
    const auto log_std = param_view(p.theta, record_.log_std_offset, {1, features});
    x = at::cat({x, log_std.expand({x.size(0), x.size(1), features})}, 2);
    if (p.carries_tangent()) {
      const auto direction = param_view(p.tangent, record_.log_std_offset, {1, features})
                                 .expand({x.size(0), x.size(1), features});
      rx = at::cat({rx.defined() ? rx : at::zeros_like(direction), direction}, 2);
    }
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    const int64_t features = record_.features;
    write_param(p.grad, record_.log_std_offset, gy.narrow(2, features, features).sum(1));
    if (p.carries_tangent()) {
      if (rgy.defined()) {
        write_param(p.grad_tangent, record_.log_std_offset,
                    rgy.narrow(2, features, features).sum(1));
        rgy = rgy.narrow(2, 0, features).contiguous();
      } else {
        p.grad_tangent.narrow(1, record_.log_std_offset, features).zero_();
      }
    }
    gy = gy.narrow(2, 0, features).contiguous();
  }

 private:
  AppendLogStdRecord record_;
};

}  // namespace

std::unique_ptr<Layer> make_layer(const AppendLogStdRecord& record) {
  return std::make_unique<AppendLogStd>(record);
}

}  // namespace maml_ext
