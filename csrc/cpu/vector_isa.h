// Which instruction set the CPU kernels run, and the one way they get a version per instruction
// set. The extension is built without -march (it must load on any x86-64), so kernels where vector
// width matters are compiled twice, for AVX2 + FMA and for baseline x86-64: their header is
// included once per instruction set through for_each_isa.h, into the namespaces avx2 and baseline,
// and MAML_EXT_ISA_DISPATCH picks one of the two per call. Users: cpu/mlp_task_kernels.h (the MLP
// path), cpu/batch_norm_cpu_kernels.h (batch norm).
#pragma once

#include <utility>

// Defined where an AVX2 + FMA version of those kernels is compiled: GCC on x86-64 (for_each_isa.h
// uses `#pragma GCC target`, which other compilers do not honour; they get the baseline version).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MAML_EXT_AVX2_VERSIONS 1
#endif

// For the kernel headers: functions always inlined into their caller (so they take the caller's
// instruction set and registers), and functions kept as one instance per instruction set.
#if defined(__GNUC__)
#define MAML_INLINE inline __attribute__((always_inline))
#define MAML_NOINLINE __attribute__((noinline))
#else
#define MAML_INLINE inline
#define MAML_NOINLINE
#endif

namespace maml_ext {
namespace cpu {

// True where the AVX2 versions should run: the CPU has AVX2 and FMA and the baseline versions are
// not forced.
bool use_avx2_kernels();

// For tests: makes every kernel compiled twice run its baseline version (force = true) or the one
// the CPU supports again (false), so the baseline versions are checked on an AVX2 machine too.
// Returns the previous setting. Process-wide; not meant to be changed while kernels run.
bool force_baseline_kernels(bool force);

// PerIsa<avx2_version, baseline_version>::call: a function of the versions' signature that calls
// the one this CPU runs (use_avx2_kernels), decided on every call.
template <auto kAvx2, auto kBaseline>
struct PerIsa;

template <typename R, typename... Args, R (*kAvx2)(Args...), R (*kBaseline)(Args...)>
struct PerIsa<kAvx2, kBaseline> {
  static R call(Args... args) {
    return use_avx2_kernels() ? kAvx2(std::forward<Args>(args)...)
                              : kBaseline(std::forward<Args>(args)...);
  }
};

}  // namespace cpu
}  // namespace maml_ext

// MAML_EXT_ISA_DISPATCH(name): a pointer to a function with the signature of `name` (a function,
// or a function template's specialisation, declared in a header included through for_each_isa.h
// in the current scope) that runs avx2::name or baseline::name, whichever this CPU runs, decided
// per call (so force_baseline_kernels takes effect at once).
#ifdef MAML_EXT_AVX2_VERSIONS
#define MAML_EXT_ISA_DISPATCH(name) (&::maml_ext::cpu::PerIsa<&avx2::name, &baseline::name>::call)
#else
#define MAML_EXT_ISA_DISPATCH(name) (&baseline::name)
#endif
