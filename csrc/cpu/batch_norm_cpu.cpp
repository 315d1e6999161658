// Registers the CPU kernels of the batch-norm ops (batch_norm_cpu_kernels.h), each compiled for
// AVX2 + FMA and for baseline x86-64 and picked per call (vector_isa.h): the extension is built
// without -march, and the element loops run 8-wide over the channels instead of SSE2's four.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../batch_norm.h"
#include "../kernels/batch_norm_math.h"
#include "../kernels/batch_norm_partials.h"
#include "vector_isa.h"

namespace maml_ext {

#define MAML_EXT_PER_ISA_INCLUDE "batch_norm_cpu_kernels.h"
#include "for_each_isa.h"

TORCH_LIBRARY_IMPL(maml_ext, CPU, m) {
  m.impl("task_batch_norm", MAML_EXT_ISA_DISPATCH(task_batch_norm_cpu));
  m.impl("task_batch_norm_backward", MAML_EXT_ISA_DISPATCH(task_batch_norm_backward_cpu));
  m.impl("task_batch_norm_relu_max_pool", MAML_EXT_ISA_DISPATCH(task_batch_norm_relu_max_pool_cpu));
  m.impl("task_batch_norm_relu_max_pool_backward",
         MAML_EXT_ISA_DISPATCH(task_batch_norm_relu_max_pool_backward_cpu));
}

}  // namespace maml_ext
