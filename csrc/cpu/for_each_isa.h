// Compiles the kernel header named by MAML_EXT_PER_ISA_INCLUDE once per instruction set
// (vector_isa.h): into namespace avx2 { namespace { } } under `#pragma GCC target("avx2,fma")`
// where MAML_EXT_AVX2_VERSIONS is defined, and into namespace baseline { namespace { } } as built.
// Every function the header defines, templates and lambdas included, is compiled for its
// namespace's instruction set, so whole loops (not only the calls they make) get the vector width;
// MAML_EXT_ISA_DISPATCH picks a version per call.
//
//   #define MAML_EXT_PER_ISA_INCLUDE "my_kernels.h"
//   #include "for_each_isa.h"
//
// No include guard: each inclusion compiles the header it is given. The kernel header has none
// either (it is read once per namespace) and relies on the includer for its standard and project
// headers (included before this point, at file scope). GCC's target and optimisation options are
// restored after each copy.
#ifndef MAML_EXT_PER_ISA_INCLUDE
#error "define MAML_EXT_PER_ISA_INCLUDE to the kernel header before including for_each_isa.h"
#endif

// vector_isa.h must come first, at file scope (this file is included inside a namespace).
#ifndef MAML_INLINE
#error "include vector_isa.h before for_each_isa.h"
#endif

// The vector helpers of the kernels return 32-byte vectors by value; they are always inlined, so
// the ABI note GCC gives for the baseline version (no AVX registers to return them in) does not
// apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#ifdef MAML_EXT_AVX2_VERSIONS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {
#include MAML_EXT_PER_ISA_INCLUDE
}  // namespace
}  // namespace avx2
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#endif
namespace baseline {
namespace {
#include MAML_EXT_PER_ISA_INCLUDE
}  // namespace
}  // namespace baseline
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

#undef MAML_EXT_PER_ISA_INCLUDE
