// Which instruction set the CPU kernels compiled twice run: AVX2 + FMA where the CPU has both,
// otherwise baseline x86-64. The extension is built without -march (it must load on any x86-64),
// so kernels where vector width matters are compiled for both (cpu/mlp_task_kernels.h,
// cpu/batch_norm_cpu.cpp) and pick one per call here.
#pragma once

// Defined where an AVX2 + FMA version of those kernels is compiled (GCC-compatible compilers on
// x86-64: function-level target attributes and pragmas).
#if defined(__GNUC__) && defined(__x86_64__)
#define MAML_EXT_AVX2_VERSIONS 1
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

}  // namespace cpu
}  // namespace maml_ext
