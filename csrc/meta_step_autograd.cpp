// The Autograd kernels of the device-agnostic ops. meta_step is differentiable: its mean_query_loss
// has the gradients the op computes itself (meta_grad with respect to theta, inner_lr_grad with
// respect to inner_lr), so backward only scales them by the incoming gradient. adapt,
// program_forward and loss_hvp are not differentiable: backward through them raises.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "checks.h"
#include "meta_step.h"

namespace maml_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& meta_step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maml_ext::meta_step", "")
                             .typed<decltype(meta_step)>();
  return op;
}

// The tensor inputs' positions, as backward returns their gradients.
enum Input : size_t { kTheta, kInnerLr, kSupportX, kSupportY, kQueryX, kQueryY, kInputs = 11 };

class MetaStepFunction : public torch::autograd::Function<MetaStepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta,
                               const at::Tensor& inner_lr, const at::Tensor& support_x,
                               const at::Tensor& support_y, const at::Tensor& query_x,
                               const at::Tensor& query_y, at::IntArrayRef program,
                               at::ArrayRef<double> program_floats, int64_t loss, bool first_order,
                               bool inner_lr_grad) {
    // The rate gradient is computed whenever backward may need it, and returned only as asked.
    const bool rates_need_grad = inner_lr.requires_grad();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [query_loss, query_accuracy, support_loss, meta_grad, rate_grad, mean_query_loss] =
        meta_step_op().call(theta, inner_lr, support_x, support_y, query_x, query_y, program,
                            program_floats, loss, first_order, inner_lr_grad || rates_need_grad);
    ctx->save_for_backward({meta_grad, rates_need_grad ? rate_grad : at::Tensor()});
    const auto returned_rate_grad = inner_lr_grad ? rate_grad : at::empty({0}, theta.options());
    ctx->mark_non_differentiable(
        {query_loss, query_accuracy, support_loss, meta_grad, returned_rate_grad});
    return {query_loss, query_accuracy,     support_loss,
            meta_grad,  returned_rate_grad, mean_query_loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    for (const auto& [input, name] : {std::pair{kSupportX, "support_x"},
                                      {kSupportY, "support_y"},
                                      {kQueryX, "query_x"},
                                      {kQueryY, "query_y"}}) {
      MAML_CHECK_ARG(!ctx->needs_input_grad(input), name,
                     "maml_ext::meta_step is differentiable in theta and inner_lr only; detach ",
                     name);
    }
    const auto saved = ctx->get_saved_variables();
    const auto& grad_loss = grad_outputs[5];  // of mean_query_loss; the other outputs have none
    variable_list grads(kInputs);
    if (grad_loss.defined()) {
      grads[kTheta] = grad_loss * saved[0];
      if (saved[1].defined()) grads[kInnerLr] = grad_loss * saved[1];
    }
    return grads;
  }
};

MetaStepResult meta_step_autograd(const at::Tensor& theta, const at::Tensor& inner_lr,
                                  const at::Tensor& support_x, const at::Tensor& support_y,
                                  const at::Tensor& query_x, const at::Tensor& query_y,
                                  at::IntArrayRef program, at::ArrayRef<double> program_floats,
                                  int64_t loss, bool first_order, bool inner_lr_grad) {
  const bool differentiable =
      at::GradMode::is_enabled() &&
      (theta.requires_grad() || inner_lr.requires_grad() || support_x.requires_grad() ||
       support_y.requires_grad() || query_x.requires_grad() || query_y.requires_grad());
  if (!differentiable) {
    // Nothing to record: the kernel below, without the autograd Function's bookkeeping.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return meta_step_op().call(theta, inner_lr, support_x, support_y, query_x, query_y, program,
                               program_floats, loss, first_order, inner_lr_grad);
  }
  auto out = MetaStepFunction::apply(theta, inner_lr, support_x, support_y, query_x, query_y,
                                     program, program_floats, loss, first_order, inner_lr_grad);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace
}  // namespace maml_ext

TORCH_LIBRARY_IMPL(maml_ext, Autograd, m) {
  m.impl("meta_step", &maml_ext::meta_step_autograd);
  m.impl("meta_step_options", torch::autograd::autogradNotImplementedFallback());
  m.impl("frozen_body_meta_step", torch::autograd::autogradNotImplementedFallback());
  m.impl("adapt", torch::autograd::autogradNotImplementedFallback());
  m.impl("program_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("loss_hvp", torch::autograd::autogradNotImplementedFallback());
}
