// MAML_HOST_DEVICE: a function compiled for host and device (nvcc), or a plain inline host function
// (the C++ compiler), so the CPU and CUDA kernels share one arithmetic.
#pragma once

#if defined(__CUDACC__)
#define MAML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MAML_HOST_DEVICE inline
#endif
