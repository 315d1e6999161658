// Per-row arithmetic of softmax cross-entropy with its gradient and tangent (docs/tangent_rules.md,
// Losses; kernels/loss_math.h builds the per-task loss on it).
// Written once for host and device: the CPU kernel and the CUDA kernel both call these, so the CPU
// tests exercise the arithmetic the GPU runs.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace maml_ext {
namespace kernels {

// Overloads by precision, callable from host and device (expf/log1pf exist in both worlds).
MAML_HOST_DEVICE float exp_of(float x) { return expf(x); }
MAML_HOST_DEVICE double exp_of(double x) { return ::exp(x); }
MAML_HOST_DEVICE float log1p_of(float x) { return log1pf(x); }
MAML_HOST_DEVICE double log1p_of(double x) { return ::log1p(x); }

// One row of logits z[0..classes): writes g = softmax(z) − onehot(target) (not divided by the
// number of rows; the caller owns the mean) and, when z_tangent is given, the tangent
// R{g} = p ⊙ (R{z} − Σ_j p_j R{z}_j). Returns the row's loss logsumexp(z) − z[target];
// *correct is 1 when the argmax (first maximum) is the target. A target outside [0, classes) gives
// NaN loss and gradients.
template <typename scalar_t>
MAML_HOST_DEVICE scalar_t softmax_cross_entropy_row(const scalar_t* z, const scalar_t* z_tangent,
                                                    int64_t target, int64_t classes, scalar_t* grad,
                                                    scalar_t* grad_tangent, scalar_t* correct) {
  if (target < 0 || target >= classes) {
    // No class to score: NaN loss and gradient, so that a GPU caller detects it in its one
    // non-finite check instead of reading out of bounds or synchronising to check first.
    const scalar_t nan = scalar_t(NAN);
    for (int64_t j = 0; j < classes; ++j) {
      grad[j] = nan;
      if (grad_tangent != nullptr) grad_tangent[j] = nan;
    }
    *correct = scalar_t(0);
    return nan;
  }
  int64_t argmax = 0;
  scalar_t max_logit = z[0];
  for (int64_t j = 1; j < classes; ++j) {
    if (z[j] > max_logit) {
      max_logit = z[j];
      argmax = j;
    }
  }
  // The argmax contributes exp(0) = 1 exactly; the others are summed apart so that the loss can
  // take log1p of them: a confident row (loss near 0) would otherwise lose the small sum's digits
  // in rounding 1 + others, several float32 ulps of the loss.
  scalar_t sum_exp_others = 0;
  for (int64_t j = 0; j < classes; ++j) {
    if (j != argmax) sum_exp_others += exp_of(z[j] - max_logit);
  }
  const scalar_t sum_exp = scalar_t(1) + sum_exp_others;
  const scalar_t inv_sum = scalar_t(1) / sum_exp;
  // Σ_j p_j R{z}_j: the tangent of the log-normaliser.
  scalar_t mean_tangent = 0;
  for (int64_t j = 0; j < classes; ++j) {
    const scalar_t p = exp_of(z[j] - max_logit) * inv_sum;
    grad[j] = p - (j == target ? scalar_t(1) : scalar_t(0));
    if (z_tangent != nullptr) {
      mean_tangent += p * z_tangent[j];
    }
  }
  if (z_tangent != nullptr) {
    for (int64_t j = 0; j < classes; ++j) {
      const scalar_t p = grad[j] + (j == target ? scalar_t(1) : scalar_t(0));
      grad_tangent[j] = p * (z_tangent[j] - mean_tangent);
    }
  }
  *correct = argmax == target ? scalar_t(1) : scalar_t(0);
  // (max − z[target]) first: 0 for a right answer, otherwise no smaller than the loss itself;
  // max + log1p(·) first would round at the logits' magnitude before z[target] came off again.
  return (max_logit - z[target]) + log1p_of(sum_exp_others);
}

}  // namespace kernels
}  // namespace maml_ext
