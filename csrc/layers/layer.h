// One layer of the program: task-batched forward and backward passes that optionally carry a
// tangent (Pearlmutter's R-operator), so one forward and one backward give the gradient and the
// Hessian-vector product together. Every layer's rules: docs/tangent_rules.md.
//
// Activations are [T, N, ...]: task, sample, then the sample's own shape (images travel
// sample-major inside the program, see conv2d.cpp). Per-task parameters are slices of one flat
// [T, P] tensor; a [T, P] tensor with stride 0 over T means every task has the same weights (step 0
// of the inner loop), which layers exploit by running one large batch.
//
// Device-agnostic: every layer is written with ATen ops (and maml_ext kernels reached through the
// dispatcher), so the same program runs on CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "../program_records.h"

namespace maml_ext {

// The per-task parameter tensors of one pass. `tangent` undefined: no tangent is carried.
struct PassParams {
  at::Tensor theta;         // [T, P] weights
  at::Tensor tangent;       // [T, P] direction v of the Hessian-vector product
  at::Tensor grad;          // [T, P] written by backward: ∂L/∂θ per task
  at::Tensor grad_tangent;  // [T, P] written by backward when a tangent is carried: H v per task

  bool carries_tangent() const { return tangent.defined(); }
  int64_t tasks() const { return theta.size(0); }
};

// forward replaces x by y (and rx by R{y}); an undefined rx is a zero tangent (the data does not
// depend on θ). backward replaces gy by ∂L/∂x (and rgy by R{∂L/∂x}) when the input gradient is
// needed, and writes the layer's slices of grad / grad_tangent; an undefined rgy is a zero tangent.
// Saved state (the tape) lives in the layer between its forward and its backward.
class Layer {
 public:
  virtual ~Layer() = default;
  virtual void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) = 0;
  virtual void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                        bool need_input_grad) = 0;

  // Peephole fusion (Program offers each record to the layer built before it): a layer that runs
  // the next record in its own epilogue returns true, and that record gets no layer of its own.
  virtual bool absorb(const LayerRecord& /*next*/) { return false; }

  // Called with the layer built after this one, for fusions across the two.
  virtual void link(Layer& /*next*/) {}

  // Where this layer takes per-channel partial statistics of its input, of `channels` channels,
  // from the layer before it (which computes them in its epilogue); nullptr when it does not.
  virtual at::Tensor* input_statistics_slot(int64_t /*channels*/) { return nullptr; }
};

// One factory per record kind, each defined in its layer's file (csrc/layers/<kind>.cpp). A kind
// without one fails to link.
#define MAML_EXT_DECLARE_MAKE_LAYER(Name, ...) \
  std::unique_ptr<Layer> make_layer(const Name##Record& record);
MAML_EXT_LAYER_RECORDS(MAML_EXT_DECLARE_MAKE_LAYER)
#undef MAML_EXT_DECLARE_MAKE_LAYER

// The residual block out = main(x) + shortcut(x) over two lists of built layers (an empty
// shortcut is the identity); Program builds it from the residual_* records (residual.cpp).
std::unique_ptr<Layer> make_residual_block(std::vector<std::unique_ptr<Layer>> main,
                                           std::vector<std::unique_ptr<Layer>> shortcut);

// ---- helpers shared by the layers ------------------------------------------------------------

// True when every task shares the same weights (a [T, P] view with stride 0 over tasks).
inline bool shared_across_tasks(const at::Tensor& theta) {
  return theta.size(0) == 1 || theta.stride(0) == 0;
}

// [T, shape...] view of the slice [offset, offset + numel(shape)) of a flat [T, P] tensor.
inline at::Tensor param_view(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape) {
  std::vector<int64_t> sizes{flat.size(0)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  const int64_t numel = c10::multiply_integers(shape);
  return flat.narrow(1, offset, numel).view(sizes);
}

// Writes value [T, ...] into the slice of a flat [T, P] tensor at offset.
inline void write_param(const at::Tensor& flat, int64_t offset, const at::Tensor& value) {
  const int64_t tasks = flat.size(0);
  const int64_t numel = value.numel() / tasks;
  flat.narrow(1, offset, numel).copy_(value.reshape({tasks, numel}));
}

// Image activations are kept sample-major, [N, T, C, H, W], stored channels-last (N, H, W, T·C in
// memory). Viewed as [N, T·C, H, W] without a copy, the T per-task convolutions are one grouped
// convolution and the per-task batch norms one batch norm over T·C channels. On the CPU
// channels-last is also oneDNN's own format (NCHW costs a reorder per call; bench/NOTES.md).
inline at::Tensor grouped(const at::Tensor& x) {
  return x.reshape({x.size(0), x.size(1) * x.size(2), x.size(3), x.size(4)});
}

inline at::Tensor channels_last(const at::Tensor& x) {
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace maml_ext
