#include "meta_gradient.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include "checks.h"
#include "meta_step.h"
#include "program_records.h"

namespace maml_ext {
namespace {

MetaStepResult dispatch_meta_step(const at::Tensor& theta, const at::Tensor& inner_lr,
                                  const at::Tensor& support_x, const at::Tensor& support_y,
                                  const at::Tensor& query_x, const at::Tensor& query_y,
                                  at::IntArrayRef program, at::ArrayRef<double> program_floats,
                                  int64_t loss, bool first_order) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maml_ext::meta_step", "")
                             .typed<decltype(meta_step)>();
  return op.call(theta, inner_lr, support_x, support_y, query_x, query_y, program, program_floats,
                 loss, first_order, /*inner_lr_grad=*/false);
}

// θ [P]: the parameters flattened and concatenated in slot order, after checking them against the
// program's slots.
at::Tensor flatten_params(at::TensorList params, const std::vector<ParameterSlice>& slices) {
  MAML_CHECK_ARG(params.size() == slices.size(), "params", "expected the program's ", slices.size(),
                 " parameter tensors, got ", params.size());
  std::vector<at::Tensor> flat;
  flat.reserve(params.size());
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    MAML_CHECK_ARG(p.defined(), "params", "tensor ", i, " is undefined");
    check_same_device_dtype(p, params[0], "params");
    MAML_CHECK_ARG(p.numel() == slices[i].numel, "params", "expected tensor ", i, " to hold ",
                   slices[i].numel, " elements (its slot in the program), got shape ", p.sizes());
    // Concatenation lays θ out in slot order, which must be the program's offsets.
    MAML_CHECK_ARG(slices[i].offset == offset, "program", "expected parameter ", i, " at offset ",
                   offset, ", got ", slices[i].offset);
    offset += slices[i].numel;
    flat.push_back(p.reshape({-1}));
  }
  return at::cat(flat);
}

// 0-d bool: the mean query loss and every element of meta_grad are finite. One pass over both
// by mixed-precision training's overflow check (found_inf, here with a scale of 1, which leaves
// the values bit for bit): exact where a finite-sum test is not (finite values whose sum
// overflows), and nothing is read back to the host, so on a GPU it stays a device tensor.
at::Tensor all_finite(const at::Tensor& meta_grad, const at::Tensor& query_loss) {
  const auto options = meta_grad.options().dtype(at::kFloat);
  auto found_non_finite = at::scalar_tensor(0, options);
  at::_amp_foreach_non_finite_check_and_unscale_({meta_grad, query_loss}, found_non_finite,
                                                 at::scalar_tensor(1, options));
  return found_non_finite.logical_not();
}

struct StepSummary {
  at::Tensor query_loss, query_accuracy, support_loss, finite;
};

// The same summary by loops over raw memory, for CPU tensors: at the sinusoid's size ATen's mean
// costs as much as a task (bench/NOTES.md). Means summed in task order; the flag from Σ (g − g),
// which is 0 for finite values and NaN as soon as one is NaN or infinite, so the loop has no branch
// and vectorises.
StepSummary cpu_summary(const at::Tensor& meta_grad, const at::Tensor& mean_query_loss,
                        const at::Tensor& query_accuracy, const at::Tensor& support_loss) {
  StepSummary out{
      mean_query_loss,
      query_accuracy.numel() > 0 ? at::empty({}, query_accuracy.options()) : query_accuracy,
      at::empty({}, support_loss.options()), at::empty({}, meta_grad.options().dtype(at::kBool))};
  AT_DISPATCH_FLOATING_TYPES(meta_grad.scalar_type(), "meta_gradient_summary", [&] {
    auto mean = [](const at::Tensor& values) {
      const auto v = values.contiguous();
      const scalar_t* p = v.data_ptr<scalar_t>();
      scalar_t sum = 0;
      for (int64_t i = 0; i < v.numel(); ++i) sum += p[i];
      return sum / static_cast<scalar_t>(v.numel());
    };
    const scalar_t loss = *mean_query_loss.data_ptr<scalar_t>();
    if (query_accuracy.numel() > 0) *out.query_accuracy.data_ptr<scalar_t>() = mean(query_accuracy);
    *out.support_loss.data_ptr<scalar_t>() = mean(support_loss);
    const scalar_t* g = meta_grad.data_ptr<scalar_t>();
    const int64_t n = meta_grad.numel();
    scalar_t lanes[8] = {};  // independent sums: one serial chain of additions would be slower
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) lanes[j] += g[i + j] - g[i + j];
    }
    scalar_t zero_if_finite = loss - loss;
    for (; i < n; ++i) zero_if_finite += g[i] - g[i];
    for (const scalar_t lane : lanes) zero_if_finite += lane;
    *out.finite.data_ptr<bool>() = zero_if_finite == scalar_t(0);
  });
  return out;
}

// Any device: ATen ops, nothing read back to the host.
StepSummary device_summary(const at::Tensor& meta_grad, const at::Tensor& mean_query_loss,
                           const at::Tensor& query_accuracy, const at::Tensor& support_loss) {
  // Separate means, not rows of one reduction: outputs that share storage would surprise a
  // caller who updates one in place.
  return {mean_query_loss, query_accuracy.numel() > 0 ? query_accuracy.mean() : query_accuracy,
          support_loss.mean(), all_finite(meta_grad, mean_query_loss)};
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_gradient(
    at::TensorList params, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss, bool first_order) {
  MAML_CHECK_ARG(!params.empty(), "params", "expected at least one parameter tensor");
  check_floating(params[0], "params");
  const at::OptionalDeviceGuard device_guard(at::device_of(params[0]));
  const auto slices = parse_program(program, program_floats).parameters;
  const auto theta = flatten_params(params, slices);
  const auto [query_loss, query_accuracy, support_loss, meta_grad, unused_rate_grad,
              mean_query_loss] =
      dispatch_meta_step(theta, inner_lr, support_x, support_y, query_x, query_y, program,
                         program_floats, loss, first_order);
  // Each gradient a view of meta_grad in its parameter's shape (one op each: these µs count for
  // small models).
  const auto flat_grad = meta_grad.contiguous();
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto sizes = params[i].sizes();
    grads.push_back(flat_grad.as_strided(sizes, c10::contiguous_strides(sizes),
                                         flat_grad.storage_offset() + slices[i].offset));
  }
  auto summary = flat_grad.is_cpu()
                     ? cpu_summary(flat_grad, mean_query_loss, query_accuracy, support_loss)
                     : device_summary(flat_grad, mean_query_loss, query_accuracy, support_loss);
  return {std::move(grads), std::move(summary.query_loss), std::move(summary.query_accuracy),
          std::move(summary.support_loss), std::move(summary.finite)};
}

namespace {

// The op is not differentiable (its outputs are gradients for an optimiser; nothing
// differentiates through them), but MetaOptimizer calls it with parameters that require grad.
// Without this kernel, autograd's fallback would run the kernel with autograd still on for the
// ops inside (recording a graph through cat, meta_step and the means) and mark the outputs as
// requiring grad; below it, nothing is recorded and the outputs are plain tensors.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
meta_gradient_autograd(at::TensorList params, const at::Tensor& inner_lr,
                       const at::Tensor& support_x, const at::Tensor& support_y,
                       const at::Tensor& query_x, const at::Tensor& query_y,
                       at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss,
                       bool first_order) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maml_ext::meta_gradient", "")
                             .typed<decltype(meta_gradient)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(params, inner_lr, support_x, support_y, query_x, query_y, program, program_floats,
                 loss, first_order);
}

}  // namespace
}  // namespace maml_ext

// One kernel for every backend: it only composes ops that dispatch by themselves.
TORCH_LIBRARY_IMPL(maml_ext, CompositeExplicitAutograd, m) {
  m.impl("meta_gradient", &maml_ext::meta_gradient);
}

TORCH_LIBRARY_IMPL(maml_ext, Autograd, m) {
  m.impl("meta_gradient", &maml_ext::meta_gradient_autograd);
}
