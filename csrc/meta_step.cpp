#include "meta_step.h"

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <vector>

#include <torch/library.h>

#include "checks.h"
#include "program.h"

namespace maml_ext {
namespace {

// Task-batched data: x [T, N, ...] floating like theta; y class indices [T, N] or targets.
void check_data(const at::Tensor& theta, const at::Tensor& x, const at::Tensor& y, int64_t tasks,
                const char* x_name, const char* y_name, LossKind loss) {
  check_same_device_dtype(x, theta, x_name);
  MAML_CHECK_ARG(x.dim() >= 3, x_name, "expected task-batched inputs [T, N, ...], got shape ",
                 x.sizes());
  MAML_CHECK_ARG(x.size(0) == tasks, x_name, "expected ", tasks, " tasks, got shape ", x.sizes());
  MAML_CHECK_ARG(y.device() == theta.device(), y_name, "expected a tensor on ", theta.device(),
                 ", got one on ", y.device());
  MAML_CHECK_ARG(y.dim() >= 2 && y.size(0) == tasks && y.size(1) == x.size(1), y_name, "expected [",
                 tasks, ", ", x.size(1), ", ...] to match ", x_name, ", got shape ", y.sizes());
  if (has_class_targets(loss)) {
    MAML_CHECK_ARG(y.dim() == 2 && y.scalar_type() == at::kLong, y_name,
                   "expected int64 class indices [T, N], got ", y.scalar_type(), " of shape ",
                   y.sizes());
  } else {
    check_same_device_dtype(y, theta, y_name);
  }
}

// theta as [T, P]: a [P] vector becomes a stride-0 view shared by all tasks.
at::Tensor per_task(const at::Tensor& theta, int64_t tasks, const char* name) {
  check_floating(theta, name);
  if (theta.dim() == 1) return theta.contiguous().unsqueeze(0).expand({tasks, theta.size(0)});
  MAML_CHECK_ARG(theta.dim() == 2 && theta.size(0) == tasks, name, "expected [P] or [", tasks,
                 ", P], got shape ", theta.sizes());
  return theta.stride(0) == 0 ? theta : theta.contiguous();
}

void check_inner_lr(const at::Tensor& inner_lr, const at::Tensor& theta) {
  check_same_device_dtype(inner_lr, theta, "inner_lr");
  MAML_CHECK_ARG(inner_lr.dim() == 2 && inner_lr.size(0) >= 1 && inner_lr.size(1) == theta.size(-1),
                 "inner_lr", "expected per-step, per-element rates [K >= 1, ", theta.size(-1),
                 "], got shape ", inner_lr.sizes());
}

// Tasks per chunk of a pass over a large set (the query set; iMAML's and Reptile's query passes
// through loss_hvp and program_forward; ANIL's body over the query set). Its tape (the activations
// of N samples per task) is the largest allocation of a meta-step: on the CPU, image programs run
// it one task at a time, which bounds the tape to one task's activations (miniImageNet 5-way:
// ~300 MB instead of T times that) and costs no speed there, where a grouped convolution over T
// tasks is no faster than T separate ones (bench/NOTES.md). On CUDA all tasks go in one launch
// sequence: that batching is the point.
int64_t task_chunk(const at::Tensor& x, int64_t tasks) {
  const bool images = x.dim() == 5;
  return x.is_cuda() || !images ? tasks : 1;
}

// fn(start, size) for consecutive chunks of task_chunk(x, tasks) tasks covering 0..tasks.
template <typename Fn>
void for_each_task_chunk(const at::Tensor& x, int64_t tasks, Fn&& fn) {
  const int64_t chunk = task_chunk(x, tasks);
  for (int64_t start = 0; start < tasks; start += chunk) fn(start, std::min(chunk, tasks - start));
}

// Per-task losses (and accuracies) of the chunks, in task order.
LossValue concatenate(const std::vector<LossValue>& chunks) {
  if (chunks.size() == 1) return chunks.front();
  std::vector<at::Tensor> losses, accuracies;
  for (const auto& value : chunks) {
    losses.push_back(value.loss);
    if (value.accuracy.defined()) accuracies.push_back(value.accuracy);
  }
  return {at::cat(losses), accuracies.empty() ? at::Tensor() : at::cat(accuracies)};
}

// The gradient pass (and, with a tangent v, the HVP) at per-task weights theta [T, P] on (x, y),
// in chunks of tasks; fills grad [T, P] (and hv [T, P]).
LossValue chunked_gradient(Program& program, const at::Tensor& theta, const at::Tensor& v,
                           const at::Tensor& grad, const at::Tensor& hv, const at::Tensor& x,
                           const at::Tensor& y) {
  std::vector<LossValue> chunks;
  const auto part = [](const at::Tensor& t, int64_t start, int64_t size) {
    return t.defined() ? t.narrow(0, start, size) : t;
  };
  for_each_task_chunk(x, theta.size(0), [&](int64_t start, int64_t size) {
    chunks.push_back(program.gradient({part(theta, start, size), part(v, start, size),
                                       part(grad, start, size), part(hv, start, size)},
                                      x.narrow(0, start, size), y.narrow(0, start, size)));
  });
  return concatenate(chunks);
}

// The query gradient pass at per-task weights theta [T, P], in chunks of tasks; fills grad [T, P].
LossValue query_gradient(Program& program, const at::Tensor& theta, const at::Tensor& grad,
                         const at::Tensor& x, const at::Tensor& y) {
  return chunked_gradient(program, theta, at::Tensor(), grad, at::Tensor(), x, y);
}

}  // namespace

int64_t check_meta_step_args(const ProgramRecords& program, LossKind loss, const at::Tensor& theta,
                             const at::Tensor& inner_lr, const at::Tensor& support_x,
                             const at::Tensor& support_y, const at::Tensor& query_x,
                             const at::Tensor& query_y) {
  check_floating(theta, "theta");
  check_dim(theta, 1, "theta");
  check_inner_lr(inner_lr, theta);
  const int64_t tasks = support_x.dim() > 0 ? support_x.size(0) : 0;
  MAML_CHECK_ARG(tasks >= 1, "support_x", "expected at least one task, got shape ",
                 support_x.sizes());
  check_data(theta, support_x, support_y, tasks, "support_x", "support_y", loss);
  check_data(theta, query_x, query_y, tasks, "query_x", "query_y", loss);
  check_parameters_tile(program, theta.size(0));
  return tasks;
}

MetaStepResult meta_step(const at::Tensor& theta, const at::Tensor& inner_lr,
                         const at::Tensor& support_x, const at::Tensor& support_y,
                         const at::Tensor& query_x, const at::Tensor& query_y,
                         at::IntArrayRef program, at::ArrayRef<double> program_floats, int64_t loss,
                         bool first_order, bool inner_lr_grad) {
  return general_meta_step(parse_program(program, program_floats), loss_kind(loss), theta, inner_lr,
                           support_x, support_y, query_x, query_y, first_order, inner_lr_grad);
}

MetaStepResult general_meta_step(const ProgramRecords& records, LossKind loss,
                                 const at::Tensor& theta, const at::Tensor& inner_lr,
                                 const at::Tensor& support_x, const at::Tensor& support_y,
                                 const at::Tensor& query_x, const at::Tensor& query_y,
                                 bool first_order, bool inner_lr_grad) {
  auto out = sweep_meta_step(records, loss, theta, inner_lr, support_x, support_y, query_x, query_y,
                             first_order, inner_lr_grad, at::Tensor(), at::Tensor());
  return {std::move(out.query_loss), std::move(out.query_accuracy), std::move(out.support_loss),
          std::move(out.meta_grad),  std::move(out.inner_lr_grad),  std::move(out.objective)};
}

MetaStepOptionsResult sweep_meta_step(const ProgramRecords& records, LossKind loss,
                                      const at::Tensor& theta, const at::Tensor& inner_lr,
                                      const at::Tensor& support_x, const at::Tensor& support_y,
                                      const at::Tensor& query_x, const at::Tensor& query_y,
                                      bool first_order, bool inner_lr_grad,
                                      const at::Tensor& query_weights,
                                      const at::Tensor& inner_shift) {
  const at::OptionalDeviceGuard device_guard(at::device_of(theta));
  const int64_t tasks =
      check_meta_step_args(records, loss, theta, inner_lr, support_x, support_y, query_x, query_y);
  const int64_t num_params = theta.size(0), steps = inner_lr.size(0);
  const bool weighted = query_weights.defined(), shifted = inner_shift.defined();
  if (weighted) {
    check_same_device_dtype(query_weights, theta, "query_weights");
    MAML_CHECK_ARG(query_weights.dim() == 1 && query_weights.size(0) == steps, "query_weights",
                   "expected one weight per inner step [", steps, "], got shape ",
                   query_weights.sizes());
  }
  if (shifted) {
    check_same_device_dtype(inner_shift, theta, "inner_shift");
    MAML_CHECK_ARG(inner_shift.sizes() == inner_lr.sizes(), "inner_shift",
                   "expected per-step shifts shaped like inner_lr ", inner_lr.sizes(), ", got ",
                   inner_shift.sizes());
  }
  Program program(records, loss);
  const auto sx = support_x.contiguous(), sy = support_y.contiguous();
  const auto qx = query_x.contiguous(), qy = query_y.contiguous();
  const auto alpha = inner_lr.contiguous();
  const auto options = theta.options();

  // φ_1 … φ_K (the weights after each step, before any shift) and g_0 … g_{K-1} per task. The
  // support pass of step k runs at θ_k = φ_k + δ_{k-1}; θ_0 is θ itself, shared (a stride-0 view).
  const auto theta_0 = per_task(theta, tasks, "theta");
  const auto adapted = at::empty({steps, tasks, num_params}, options);
  const auto support_grads = at::empty({steps, tasks, num_params}, options);
  auto theta_at = [&](int64_t k) {
    if (k == 0) return theta_0;
    return shifted ? adapted[k - 1] + inner_shift[k - 1] : adapted[k - 1];
  };

  at::Tensor support_loss;
  for (int64_t k = 0; k < steps; ++k) {
    const auto theta_k = theta_at(k);
    PassParams pass{theta_k, at::Tensor(), support_grads[k], at::Tensor()};
    const auto value = program.gradient(pass, sx, sy);
    if (k == 0) support_loss = value.loss;
    // φ_{k+1} = θ_k − α_k ⊙ g_k
    auto next_theta = adapted[k];
    at::sub_out(next_theta, theta_k, support_grads[k] * alpha[k]);
  }

  auto lambda = at::empty({tasks, num_params}, options);
  const auto query = query_gradient(program, adapted[steps - 1], lambda, qx, qy);
  // The meta-objective: Σ_j w_j · mean query loss at φ_{j+1} with weights, else the final one's.
  auto objective = query.loss.mean();
  if (weighted) {
    objective = objective * query_weights[steps - 1];
    lambda.mul_(query_weights[steps - 1]);
  }

  auto alpha_grad =
      inner_lr_grad ? at::empty({steps, num_params}, options) : at::empty({0}, options);
  auto shift_grad = shifted ? at::empty({steps, num_params}, options) : at::empty({0}, options);
  if (shifted) shift_grad[steps - 1].zero_();  // δ_{K-1} moves no pass
  auto scratch_grad = at::empty({tasks, num_params}, options);
  auto hessian_vector = at::empty({tasks, num_params}, options);
  const double inv_tasks = 1.0 / static_cast<double>(tasks);
  // λ holds the adjoint of φ_{k+1} on entry to iteration k, of φ_k (θ_0 at the end) on exit.
  for (int64_t k = steps - 1; k >= 0; --k) {
    // dα_k = −λ_{k+1} ⊙ g_k, averaged over tasks (the meta-loss is the task mean).
    if (inner_lr_grad) {
      auto alpha_grad_k = alpha_grad[k];
      at::sum_out(alpha_grad_k, lambda * support_grads[k], {0}).mul_(-inv_tasks);
    }
    if (!first_order) {
      // λ_k = λ_{k+1} − H_S(θ_k)(α_k ⊙ λ_{k+1})
      PassParams pass{theta_at(k), lambda * alpha[k], scratch_grad, hessian_vector};
      program.gradient(pass, sx, sy);
      lambda.sub_(hessian_vector);
    }
    if (k == 0) break;
    // θ_k = φ_k + δ_{k-1}: dδ_{k-1} is the adjoint of θ_k, averaged over tasks.
    if (shifted) {
      auto shift_grad_k = shift_grad[k - 1];
      at::mean_out(shift_grad_k, lambda, {0});
    }
    // The query loss at φ_k counts with weight w_{k-1}: λ += w_{k-1} ∇L_Q(φ_k).
    if (weighted) {
      const auto value = query_gradient(program, adapted[k - 1], scratch_grad, qx, qy);
      objective = objective + value.loss.mean() * query_weights[k - 1];
      lambda.add_(scratch_grad * query_weights[k - 1]);
    }
  }
  auto meta_grad = lambda.mean(0);
  auto accuracy = query.accuracy.defined() ? query.accuracy : at::empty({0}, options);
  return {query.loss, accuracy, support_loss, meta_grad, alpha_grad, shift_grad, objective};
}

MetaStepOptionsTuple meta_step_options(const at::Tensor& theta, const at::Tensor& inner_lr,
                                       const at::Tensor& support_x, const at::Tensor& support_y,
                                       const at::Tensor& query_x, const at::Tensor& query_y,
                                       at::IntArrayRef program, at::ArrayRef<double> program_floats,
                                       int64_t loss, bool first_order, bool inner_lr_grad,
                                       const std::optional<at::Tensor>& query_weights,
                                       const std::optional<at::Tensor>& inner_shift) {
  auto out =
      sweep_meta_step(parse_program(program, program_floats), loss_kind(loss), theta, inner_lr,
                      support_x, support_y, query_x, query_y, first_order, inner_lr_grad,
                      query_weights.value_or(at::Tensor()), inner_shift.value_or(at::Tensor()));
  return {std::move(out.query_loss), std::move(out.query_accuracy), std::move(out.support_loss),
          std::move(out.meta_grad),  std::move(out.inner_lr_grad),  std::move(out.inner_shift_grad),
          std::move(out.objective)};
}

MetaStepOptionsTuple frozen_body_meta_step(
    const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    at::IntArrayRef body_program, at::ArrayRef<double> body_floats, at::IntArrayRef head_program,
    at::ArrayRef<double> head_floats, int64_t loss, bool first_order, bool inner_lr_grad) {
  const at::OptionalDeviceGuard device_guard(at::device_of(theta));
  const auto body_records = parse_program(body_program, body_floats);
  const auto head_records = parse_program(head_program, head_floats);
  const LossKind kind = loss_kind(loss);
  check_floating(theta, "theta");
  check_dim(theta, 1, "theta");
  int64_t body_params = 0;
  for (const auto& slice : body_records.parameters) body_params += slice.numel;
  const int64_t num_params = theta.size(0), head_params = num_params - body_params;
  MAML_CHECK_ARG(head_params >= 1, "theta", "expected the body's ", body_params,
                 " parameters followed by the head's, got ", num_params, " in all");
  check_parameters_tile(body_records, body_params);
  const auto theta_head = theta.narrow(0, body_params, head_params);
  const int64_t tasks = check_meta_step_args(head_records, kind, theta_head, inner_lr, support_x,
                                             support_y, query_x, query_y);
  const int64_t steps = inner_lr.size(0);
  const auto options = theta.options();

  // The body's features of the support set, once, at the shared θ; the program keeps its tape
  // for the single backward at the end. (The query set's pass comes after the inner loop.)
  Program body_support(body_records), body_query(body_records);
  const auto theta_body = per_task(theta.narrow(0, 0, body_params), tasks, "theta");
  const auto features_s = body_support.forward(theta_body, support_x.contiguous());
  MAML_CHECK_ARG(features_s.dim() == 3, "body_program",
                 "expected the frozen layers to end in features [T, N, F], got shape ",
                 features_s.sizes());
  const auto sy = support_y.contiguous(), qy = query_y.contiguous();

  // MAML's sweep over the head alone (csrc/meta_step.h), which also returns, per step, the
  // tangent of the support features' gradient: the body's share of H_S (α_k ⊙ λ_{k+1}).
  Program head(head_records, kind);
  const auto alpha = inner_lr.contiguous();
  const auto head_0 = per_task(theta_head, tasks, "theta");
  const auto adapted = at::empty({steps, tasks, head_params}, options);
  const auto support_grads = at::empty({steps, tasks, head_params}, options);
  auto theta_at = [&](int64_t k) { return k == 0 ? head_0 : adapted[k - 1]; };
  at::Tensor support_loss;
  for (int64_t k = 0; k < steps; ++k) {
    PassParams pass{theta_at(k), at::Tensor(), support_grads[k], at::Tensor()};
    const auto value = head.gradient(pass, features_s, sy);
    if (k == 0) support_loss = value.loss;
    auto next_theta = adapted[k];
    at::sub_out(next_theta, theta_at(k), support_grads[k] * alpha[k]);
  }
  // The query set through body and adapted head, in chunks of tasks (one task at a time for images
  // on the CPU, as MAML's query pass: the body's tape over the query set is the step's largest
  // allocation): λ_K = the head's query gradient, and the body's share of the meta-gradient, which
  // reaches the loss only through the features.
  auto lambda = at::empty({tasks, head_params}, options);
  auto body_grad = at::empty({tasks, body_params}, options);
  const auto qx = query_x.contiguous();
  std::vector<LossValue> query_chunks;
  for_each_task_chunk(qx, tasks, [&](int64_t start, int64_t size) {
    const auto body_weights = theta_body.narrow(0, start, size);
    const auto features_q = body_query.forward(body_weights, qx.narrow(0, start, size));
    at::Tensor feature_grad, unused_tangent;
    query_chunks.push_back(head.gradient_with_input_grad(
        {adapted[steps - 1].narrow(0, start, size), at::Tensor(), lambda.narrow(0, start, size),
         at::Tensor()},
        features_q, qy.narrow(0, start, size), feature_grad, unused_tangent));
    body_query.backward(
        {body_weights, at::Tensor(), body_grad.narrow(0, start, size), at::Tensor()}, feature_grad);
  });
  const auto query = concatenate(query_chunks);

  auto alpha_grad =
      inner_lr_grad ? at::empty({steps, head_params}, options) : at::empty({0}, options);
  auto scratch_grad = at::empty({tasks, head_params}, options);
  auto hessian_vector = at::empty({tasks, head_params}, options);
  auto support_feature_adjoint = at::zeros_like(features_s);
  const double inv_tasks = 1.0 / static_cast<double>(tasks);
  for (int64_t k = steps - 1; k >= 0; --k) {
    if (inner_lr_grad) {
      auto alpha_grad_k = alpha_grad[k];
      at::sum_out(alpha_grad_k, lambda * support_grads[k], {0}).mul_(-inv_tasks);
    }
    if (!first_order) {
      PassParams pass{theta_at(k), lambda * alpha[k], scratch_grad, hessian_vector};
      at::Tensor feature_grad, feature_grad_tangent;
      head.gradient_with_input_grad(pass, features_s, sy, feature_grad, feature_grad_tangent);
      lambda.sub_(hessian_vector);
      support_feature_adjoint.sub_(feature_grad_tangent);
    }
  }

  // The body's meta-gradient through the support features.
  if (!first_order) {  // first order drops the support gradients' dependence on θ, as MAML's does
    auto support_body_grad = at::empty({tasks, body_params}, options);
    body_support.backward({theta_body, at::Tensor(), support_body_grad, at::Tensor()},
                          support_feature_adjoint);
    body_grad.add_(support_body_grad);
  }
  auto meta_grad = at::cat({body_grad.mean(0), lambda.mean(0)});
  auto accuracy = query.accuracy.defined() ? query.accuracy : at::empty({0}, options);
  auto mean_loss = query.loss.mean();
  return {query.loss, accuracy, support_loss, meta_grad, alpha_grad, at::empty({0}, options),
          mean_loss};
}

at::Tensor adapt(const at::Tensor& theta, const at::Tensor& inner_lr, const at::Tensor& support_x,
                 const at::Tensor& support_y, at::IntArrayRef program_ints,
                 at::ArrayRef<double> program_floats, int64_t loss) {
  const at::OptionalDeviceGuard device_guard(at::device_of(theta));
  const int64_t tasks = support_x.dim() > 0 ? support_x.size(0) : 0;
  MAML_CHECK_ARG(tasks >= 1, "support_x", "expected at least one task, got shape ",
                 support_x.sizes());
  auto weights = per_task(theta, tasks, "theta");
  check_inner_lr(inner_lr, theta);
  const LossKind kind = loss_kind(loss);
  check_data(theta, support_x, support_y, tasks, "support_x", "support_y", kind);
  const auto records = parse_program(program_ints, program_floats);
  check_parameters_tile(records, weights.size(1));
  Program program(records, kind);
  const auto sx = support_x.contiguous(), sy = support_y.contiguous();
  auto grad = at::empty({tasks, weights.size(1)}, weights.options());
  for (int64_t k = 0; k < inner_lr.size(0); ++k) {
    program.gradient({weights, at::Tensor(), grad, at::Tensor()}, sx, sy);
    weights = weights - grad * inner_lr[k];
  }
  return weights.stride(0) == 0 ? weights.contiguous() : weights;
}

at::Tensor program_forward(const at::Tensor& theta, const at::Tensor& x,
                           at::IntArrayRef program_ints, at::ArrayRef<double> program_floats) {
  const at::OptionalDeviceGuard device_guard(at::device_of(theta));
  MAML_CHECK_ARG(x.dim() >= 3, "x", "expected task-batched inputs [T, N, ...], got shape ",
                 x.sizes());
  check_same_device_dtype(x, theta, "x");
  const auto weights = per_task(theta, x.size(0), "theta");
  const auto records = parse_program(program_ints, program_floats);
  check_parameters_tile(records, weights.size(1));
  Program program(records);
  const auto inputs = x.contiguous();
  std::vector<at::Tensor> outputs;
  for_each_task_chunk(inputs, inputs.size(0), [&](int64_t start, int64_t size) {
    outputs.push_back(
        program.forward(weights.narrow(0, start, size), inputs.narrow(0, start, size)));
  });
  return outputs.size() == 1 ? outputs.front() : at::cat(outputs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_hvp(
    const at::Tensor& theta, const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
    at::IntArrayRef program_ints, at::ArrayRef<double> program_floats, int64_t loss) {
  const at::OptionalDeviceGuard device_guard(at::device_of(theta));
  const int64_t tasks = x.dim() > 0 ? x.size(0) : 0;
  MAML_CHECK_ARG(tasks >= 1, "x", "expected at least one task, got shape ", x.sizes());
  const auto weights = per_task(theta, tasks, "theta");
  const LossKind kind = loss_kind(loss);
  check_data(theta, x, y, tasks, "x", "y", kind);
  check_same_device_dtype(v, theta, "v");
  MAML_CHECK_ARG(v.dim() == 2 && v.size(0) == tasks && v.size(1) == weights.size(1), "v",
                 "expected [", tasks, ", ", weights.size(1), "], got shape ", v.sizes());
  const auto records = parse_program(program_ints, program_floats);
  check_parameters_tile(records, weights.size(1));
  Program program(records, kind);
  auto grad = at::empty({tasks, weights.size(1)}, weights.options());
  auto hv = at::empty({tasks, weights.size(1)}, weights.options());
  const auto value =
      chunked_gradient(program, weights, v.contiguous(), grad, hv, x.contiguous(), y.contiguous());
  return {value.loss, grad, hv};
}

}  // namespace maml_ext

// One kernel for every device: the program's layers reach device kernels through the dispatcher.
// The CPU overrides meta_step with its small-MLP path (cpu/register_cpu.cpp).
TORCH_LIBRARY_IMPL(maml_ext, CompositeExplicitAutograd, m) {
  m.impl("meta_step", &maml_ext::meta_step);
  m.impl("meta_step_options", &maml_ext::meta_step_options);
  m.impl("frozen_body_meta_step", &maml_ext::frozen_body_meta_step);
  m.impl("adapt", &maml_ext::adapt);
  m.impl("program_forward", &maml_ext::program_forward);
  m.impl("loss_hvp", &maml_ext::loss_hvp);
}
