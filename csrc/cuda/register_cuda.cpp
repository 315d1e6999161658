// The device-agnostic meta-step ops, registered for CUDA tensors (compiled only in CUDA builds,
// where cuda/ also provides the CUDA kernels they reach through the dispatcher).
#include <torch/library.h>

#include "../meta_step.h"

TORCH_LIBRARY_IMPL(maml_ext, CUDA, m) {
  m.impl("meta_step", &maml_ext::meta_step);
  m.impl("adapt", &maml_ext::adapt);
  m.impl("program_forward", &maml_ext::program_forward);
  m.impl("loss_hvp", &maml_ext::loss_hvp);
}
