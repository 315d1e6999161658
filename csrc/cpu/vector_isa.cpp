#include "vector_isa.h"

#include <atomic>

namespace maml_ext {
namespace cpu {
namespace {

std::atomic<bool> baseline_forced{false};

bool cpu_has_avx2_fma() {
#ifdef MAML_EXT_AVX2_VERSIONS
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace

bool use_avx2_kernels() {
  return cpu_has_avx2_fma() && !baseline_forced.load(std::memory_order_relaxed);
}

bool force_baseline_kernels(bool force) { return baseline_forced.exchange(force); }

}  // namespace cpu
}  // namespace maml_ext
