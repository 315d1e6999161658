// The per-task losses of the meta-step, with their gradients and tangents (docs/tangent_rules.md,
// Losses): one definition for every path that computes them.
//
// Over one task's outputs z [N, D] (N rows, D outputs per row):
// - mean-squared error against targets y [N, D]:
//     L = (1/m) Σ_e (z_e − y_e)²,  g = ∂L/∂z = s (z − y),  R{g} = s R{z},  m = N·D, s = 2/m
//   (squared_error_gradient_scale gives s);
// - softmax cross-entropy against class indices y [N]:
//     L = (1/N) Σ_r ce_r,  g_r = (1/N) (softmax(z_r) − onehot(y_r)),  R{g_r} likewise scaled,
//     accuracy = (1/N) Σ_r [argmax z_r = y_r]
//   (ce_r and the per-row gradient, tangent and hit from softmax_cross_entropy_row;
//   cross_entropy_gradient_scale gives 1/N);
// - weighted Gaussian negative log-likelihood, outputs z = [μ | s] [N, 2A] (means, log-stds),
//   targets y = [a | w] [N, 2A] (values, weights), per element e = a − μ, q = e·exp(−s):
//     L = (1/N) Σ w (½q² + s + ½ log 2π),  g_μ = −(w/N) e e^{−2s},  g_s = (w/N)(1 − q²),
//     R{g_μ} = (w/N) e^{−2s} (R{μ} + 2e R{s}),  R{g_s} = (2w/N) (e e^{−2s} R{μ} + q² R{s})
//   (mean_gaussian_nll; weights = advantages make it the policy-gradient loss).
//
// Both paths of the meta-step run these functions: the CPU MLP path (cpu/mlp_task_kernels.h) per
// task on its own buffers, the general path (loss_head.cpp) through the maml_ext::task_loss op,
// whose CPU and CUDA kernels call them per task.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "softmax_cross_entropy_math.h"

namespace maml_ext {
namespace kernels {

// s = 2/m: the mean-squared error's gradient (and tangent) per unit of z − y (of R{z}), for a
// task of m = N·D outputs.
template <typename T>
MAML_HOST_DEVICE T squared_error_gradient_scale(int64_t outputs) {
  return T(2) / static_cast<T>(outputs);
}

// 1/N: cross-entropy's gradient (and tangent) per unit of the per-row gradient, for a task of N
// rows (the loss is a mean over rows).
template <typename T>
MAML_HOST_DEVICE T cross_entropy_gradient_scale(int64_t rows) {
  return T(1) / static_cast<T>(rows);
}

// One task's mean-squared error over outputs z[m] against targets y[m]: writes the gradient
// grad[m] and, when z_tangent is given, its tangent grad_tangent[m]. Returns L.
template <typename T>
MAML_HOST_DEVICE T mean_squared_error(const T* z, const T* z_tangent, const T* y, int64_t outputs,
                                      T* grad, T* grad_tangent) {
  const T scale = squared_error_gradient_scale<T>(outputs);
  T total = 0;
  for (int64_t e = 0; e < outputs; ++e) {
    const T diff = z[e] - y[e];
    total += diff * diff;
    grad[e] = diff * scale;
  }
  // A loop of its own: no branch on z_tangent inside the loop above, which vectorises.
  if (z_tangent != nullptr) {
    for (int64_t e = 0; e < outputs; ++e) grad_tangent[e] = z_tangent[e] * scale;
  }
  return total / static_cast<T>(outputs);
}

// One task's softmax cross-entropy over logits z[rows, classes] against labels[rows]: writes the
// gradient grad[rows, classes], with z_tangent its tangent grad_tangent[rows, classes], and, when
// accuracy is given, the fraction of rows whose argmax is the label. Returns L. A label outside
// [0, classes) makes that row's loss and gradients NaN (softmax_cross_entropy_row).
template <typename T>
MAML_HOST_DEVICE T mean_cross_entropy(const T* z, const T* z_tangent, const int64_t* labels,
                                      int64_t rows, int64_t classes, T* grad, T* grad_tangent,
                                      T* accuracy) {
  const T scale = cross_entropy_gradient_scale<T>(rows);
  T total = 0;
  T correct_sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    T correct = 0;
    total += softmax_cross_entropy_row<T>(
        z + r * classes, z_tangent != nullptr ? z_tangent + r * classes : nullptr, labels[r],
        classes, grad + r * classes, z_tangent != nullptr ? grad_tangent + r * classes : nullptr,
        &correct);
    correct_sum += correct;
  }
  const int64_t size = rows * classes;
  for (int64_t e = 0; e < size; ++e) grad[e] *= scale;
  if (z_tangent != nullptr) {
    for (int64_t e = 0; e < size; ++e) grad_tangent[e] *= scale;
  }
  // A division, not × (1/N): the fraction k/N correctly rounded, as a mean over rows gives it.
  if (accuracy != nullptr) *accuracy = correct_sum / static_cast<T>(rows);
  return total * scale;
}

// ½ log 2π: the Gaussian log-density's constant, per action dimension.
template <typename T>
MAML_HOST_DEVICE constexpr T half_log_two_pi() {
  return T(0.91893853320467274178);
}

// One task's weighted Gaussian negative log-likelihood (the header's definition) over rows
// z [rows, 2A] = [μ | s] against y [rows, 2A] = [a | w]: writes the gradient grad [rows, 2A] and,
// when z_tangent is given, its tangent grad_tangent. Returns L.
template <typename T>
MAML_HOST_DEVICE T mean_gaussian_nll(const T* z, const T* z_tangent, const T* y, int64_t rows,
                                     int64_t width, T* grad, T* grad_tangent) {
  const int64_t dims = width / 2;
  const T scale = T(1) / static_cast<T>(rows);
  // Summed in double: the terms' sizes vary by e^{−2s} and their signs by the weights', where a
  // float32 running sum over thousands of steps (a rollout batch) would lose digits.
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* mean = z + r * width;
    const T* log_std = mean + dims;
    const T* value = y + r * width;
    const T* weight = value + dims;
    T* g_mean = grad + r * width;
    T* g_log_std = g_mean + dims;
    for (int64_t d = 0; d < dims; ++d) {
      const T error = value[d] - mean[d];
      const T inv_var = exp_of(T(-2) * log_std[d]);
      const T q2 = error * error * inv_var;  // q², the squared standardised error
      const T w = weight[d] * scale;
      total += static_cast<double>(weight[d] * (T(0.5) * q2 + log_std[d] + half_log_two_pi<T>()));
      g_mean[d] = -w * error * inv_var;
      g_log_std[d] = w * (T(1) - q2);
      if (z_tangent != nullptr) {
        const T r_mean = z_tangent[r * width + d], r_log_std = z_tangent[r * width + dims + d];
        grad_tangent[r * width + d] = w * inv_var * (r_mean + T(2) * error * r_log_std);
        grad_tangent[r * width + dims + d] = T(2) * w * (error * inv_var * r_mean + q2 * r_log_std);
      }
    }
  }
  return static_cast<T>(total / static_cast<double>(rows));
}

}  // namespace kernels
}  // namespace maml_ext
