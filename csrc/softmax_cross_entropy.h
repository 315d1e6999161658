// maml_ext::softmax_cross_entropy: per-row loss, correctness, gradient p − onehot and its tangent.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace maml_ext {

inline void check_softmax_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                             const std::optional<at::Tensor>& tangent) {
  check_dim(logits, 2, "logits");
  check_floating(logits, "logits");
  MAML_CHECK_ARG(logits.size(1) > 0, "logits", "expected at least one class, got shape ",
                 logits.sizes());
  check_dim(target, 1, "target");
  MAML_CHECK_ARG(target.scalar_type() == at::kLong, "target", "expected int64 class indices, got ",
                 target.scalar_type());
  MAML_CHECK_ARG(target.size(0) == logits.size(0), "target", "expected ", logits.size(0),
                 " rows (one per row of logits), got shape ", target.sizes());
  MAML_CHECK_ARG(target.device() == logits.device(), "target", "expected a tensor on ",
                 logits.device(), ", got one on ", target.device());
  if (tangent.has_value() && tangent->defined()) {
    check_same_device_dtype(*tangent, logits, "logits_tangent");
    MAML_CHECK_ARG(tangent->sizes() == logits.sizes(), "logits_tangent", "expected shape ",
                   logits.sizes(), ", got ", tangent->sizes());
  }
}

// Calls the op through the dispatcher, so the CPU or CUDA kernel runs by the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& logits_tangent);

}  // namespace maml_ext
