// A residual block, out = main(x) + shortcut(x): two branches of layers on the same input whose
// outputs are added. The fork and the addition are linear, so their rules are sums (no curvature
// term; docs/tangent_rules.md):
//   forward:           out = m + s                        R{out} = R{m} + R{s}
//   backward:          ∂m = ∂s = ∂out                     R{∂m} = R{∂s} = R{∂out}
//   the fork:          ∂x = ∂x_main + ∂x_shortcut         R{∂x} = R{∂x_main} + R{∂x_shortcut}
// Each branch is a list of layers built like the program's own (peephole fusions inside a branch;
// none across the block's edges), and it keeps its own tape, so the block nests and any branch may
// itself hold blocks. An empty shortcut is the identity.
#include <utility>
#include <vector>

#include "../checks.h"
#include "layer.h"

namespace maml_ext {
namespace {

// a + b where an undefined tangent is zero (either may be: the input does not depend on θ).
at::Tensor add_tangents(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

class ResidualBlock final : public Layer {
 public:
  ResidualBlock(std::vector<std::unique_ptr<Layer>> main,
                std::vector<std::unique_ptr<Layer>> shortcut)
      : main_(std::move(main)), shortcut_(std::move(shortcut)) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    // Layers replace their argument by a new tensor and never write into it, so both branches can
    // start from the same input.
    at::Tensor s = x, rs = rx;
    for (auto& layer : main_) layer->forward(p, x, rx);
    for (auto& layer : shortcut_) layer->forward(p, s, rs);
    MAML_CHECK_ARG(x.sizes() == s.sizes(), "model",
                   "a residual block's main branch gives activations of shape ", x.sizes(),
                   " and its shortcut ", s.sizes(), " (sample-major [N, T, ...]); they must match");
    x = x + s;
    rx = add_tangents(rx, rs);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    // The addition hands ∂out (and its tangent) to both branches unchanged.
    at::Tensor gs = gy, rgs = rgy;
    run_backward(shortcut_, p, gs, rgs, need_input_grad);
    run_backward(main_, p, gy, rgy, need_input_grad);
    if (!need_input_grad) {
      gy = rgy = at::Tensor();
      return;
    }
    gy = gy + gs;
    rgy = p.carries_tangent() ? add_tangents(rgy, rgs) : at::Tensor();
  }

 private:
  static void run_backward(std::vector<std::unique_ptr<Layer>>& layers, const PassParams& p,
                           at::Tensor& gy, at::Tensor& rgy, bool need_input_grad) {
    for (size_t i = layers.size(); i-- > 0;) {
      layers[i]->backward(p, gy, rgy, need_input_grad || i > 0);
    }
  }

  std::vector<std::unique_ptr<Layer>> main_, shortcut_;
};

// The three residual records are structure that Program turns into a block (make_residual_block);
// they never become layers of their own.
[[noreturn]] void structural_record(const char* name) {
  TORCH_INTERNAL_ASSERT(false, "maml_ext: the ", name,
                        " record is part of a residual block that Program builds");
}

}  // namespace

std::unique_ptr<Layer> make_residual_block(std::vector<std::unique_ptr<Layer>> main,
                                           std::vector<std::unique_ptr<Layer>> shortcut) {
  return std::make_unique<ResidualBlock>(std::move(main), std::move(shortcut));
}

std::unique_ptr<Layer> make_layer(const ResidualBeginRecord&) {
  structural_record(ResidualBeginRecord::name);
}

std::unique_ptr<Layer> make_layer(const ResidualShortcutRecord&) {
  structural_record(ResidualShortcutRecord::name);
}

std::unique_ptr<Layer> make_layer(const ResidualEndRecord&) {
  structural_record(ResidualEndRecord::name);
}

}  // namespace maml_ext
