// The layer program: a model's layers in order, each with task-batched forward / backward passes
// that optionally carry a tangent (Pearlmutter's R-operator), so one forward + one backward give
// the gradient and the Hessian-vector product together. Rules: shared/TANGENTS.md.
//
// Activations are [T, N, ...]: task, sample, then the sample's own shape. Per-task parameters are
// slices of one flat [T, P] tensor; a [T, P] tensor with stride 0 over T means every task has the
// same weights (step 0 of the inner loop), which layers exploit by running one large batch.
//
// Device-agnostic: every layer is written with ATen ops (and maml_ext kernels reached through the
// dispatcher), so the same program runs on CPU and CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

namespace maml_ext {

// Layer codes in the int[] program description; the Python side (maml_ext/program.py) writes it.
enum class LayerKind : int64_t {
  kLinear = 1,     // in, out, has_bias, weight_offset, bias_offset
  kConv2d = 2,     // in, out, kh, kw, stride_h, stride_w, pad_h, pad_w, has_bias, w_off, b_off
  kBatchNorm = 3,  // channels, spatial (0: 1-d, 1: 2-d), affine, w_off, b_off; eps in floats
  kReLU = 4,       // (none)
  kMaxPool2d = 5,  // kh, kw, stride_h, stride_w, pad_h, pad_w, ceil_mode
  kFlatten = 6,    // (none)
};

enum class LossKind : int64_t { kCrossEntropy = 1, kMeanSquaredError = 2 };

// One parameter tensor's slice [offset, offset + numel) of the flat θ.
struct ParameterSlice {
  int64_t offset;
  int64_t numel;
};

// The parameter slices a program description names, in record order (a layer's weight before its
// bias): the order of maml_ext/program.py's slots. Checks only that the records parse.
std::vector<ParameterSlice> parameter_slices(at::IntArrayRef ints);

// The per-task parameter tensors of one pass. `tangent` undefined: no tangent is carried.
struct PassParams {
  at::Tensor theta;         // [T, P] weights
  at::Tensor tangent;       // [T, P] direction v of the Hessian-vector product
  at::Tensor grad;          // [T, P] written by backward: ∂L/∂θ per task
  at::Tensor grad_tangent;  // [T, P] written by backward when a tangent is carried: H v per task

  bool carries_tangent() const { return tangent.defined(); }
  int64_t tasks() const { return theta.size(0); }
};

// One layer. forward replaces x by y (and rx by R{y}); an undefined rx is a zero tangent (the data
// does not depend on θ). backward replaces gy by ∂L/∂x (and rgy by R{∂L/∂x}) when the input
// gradient is needed, and writes the layer's slices of grad / grad_tangent. Saved state (the tape)
// lives in the layer between its forward and backward.
class Layer {
 public:
  virtual ~Layer() = default;
  virtual void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) = 0;
  virtual void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                        bool need_input_grad) = 0;
};

struct LossValue {
  at::Tensor loss;      // [T] per-task mean loss
  at::Tensor accuracy;  // [T] per-task accuracy (cross-entropy), undefined otherwise
};

class Program {
 public:
  // Parses the int[] / float[] description; checks that parameter slices tile [0, num_params).
  Program(at::IntArrayRef ints, at::ArrayRef<double> floats, int64_t loss, int64_t num_params);

  // Forward, loss and backward at per-task weights p.theta on (x, y): fills p.grad (and, carrying
  // a tangent, p.grad_tangent = H_L(θ) v). Returns the per-task loss.
  LossValue gradient(const PassParams& p, const at::Tensor& x, const at::Tensor& y);

  // Forward only: the per-task outputs [T, N, ...].
  at::Tensor forward(const at::Tensor& theta, const at::Tensor& x);

  int64_t num_params() const { return num_params_; }
  LossKind loss() const { return loss_; }

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  LossKind loss_;
  int64_t num_params_;
};

// True when every task shares the same weights (a [T, P] view with stride 0 over tasks).
inline bool shared_across_tasks(const at::Tensor& theta) {
  return theta.size(0) == 1 || theta.stride(0) == 0;
}

}  // namespace maml_ext
