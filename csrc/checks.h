// Input checks shared by the op implementations: messages name the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#define MAML_CHECK_ARG(cond, arg, ...) \
  TORCH_CHECK_VALUE(cond, "maml_ext: argument '", arg, "': ", __VA_ARGS__)

namespace maml_ext {

inline void check_floating(const at::Tensor& t, const char* arg) {
  MAML_CHECK_ARG(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, arg,
                 "expected float32 or float64, got ", t.scalar_type());
}

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& like, const char* arg) {
  MAML_CHECK_ARG(t.device() == like.device(), arg, "expected a tensor on ", like.device(),
                 ", got one on ", t.device());
  MAML_CHECK_ARG(t.scalar_type() == like.scalar_type(), arg, "expected dtype ", like.scalar_type(),
                 ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* arg) {
  MAML_CHECK_ARG(t.dim() == dim, arg, "expected ", dim, " dimensions, got shape ", t.sizes());
}

// An optional tensor argument that was given (present and defined).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An optional argument, where given, must match `like` in device, dtype and shape.
inline void check_like(const std::optional<at::Tensor>& t, const at::Tensor& like,
                       const char* arg) {
  if (!given(t)) return;
  check_same_device_dtype(*t, like, arg);
  MAML_CHECK_ARG(t->sizes() == like.sizes(), arg, "expected shape ", like.sizes(), ", got ",
                 t->sizes());
}

}  // namespace maml_ext
