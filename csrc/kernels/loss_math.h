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
//   cross_entropy_gradient_scale gives 1/N).
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
  if (accuracy != nullptr) *accuracy = correct_sum * scale;
  return total * scale;
}

}  // namespace kernels
}  // namespace maml_ext
