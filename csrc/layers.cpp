#include "layers.h"

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "checks.h"
#include "softmax_cross_entropy.h"
#include "task_conv.h"

namespace maml_ext {
namespace {

// [T, shape...] view of the slice [offset, offset + numel(shape)) of a flat [T, P] tensor.
at::Tensor param_view(const at::Tensor& flat, int64_t offset, at::IntArrayRef shape) {
  std::vector<int64_t> sizes{flat.size(0)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  const int64_t numel = c10::multiply_integers(shape);
  return flat.narrow(1, offset, numel).view(sizes);
}

void write_param(const at::Tensor& flat, int64_t offset, const at::Tensor& value) {
  const int64_t tasks = flat.size(0);
  const int64_t numel = value.numel() / tasks;
  flat.narrow(1, offset, numel).copy_(value.reshape({tasks, numel}));
}

class Linear final : public Layer {
 public:
  Linear(int64_t in, int64_t out, bool bias, int64_t weight_offset, int64_t bias_offset)
      : in_(in), out_(out), bias_(bias), w_off_(weight_offset), b_off_(bias_offset) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == in_, "x",
                   "Linear expects task-batched inputs [T, N, ", in_, "], got shape ", x.sizes());
    x_ = x;
    rx_ = rx;
    const auto weight = param_view(p.theta, w_off_, {out_, in_});
    at::Tensor y = times_weight_transposed(x, weight);
    if (bias_) y.add_(param_view(p.theta, b_off_, {out_}).unsqueeze(1));
    if (p.carries_tangent()) {
      // R{y} = R{x} Wᵀ + x Vᵀ + v_b
      const auto direction = param_view(p.tangent, w_off_, {out_, in_});
      at::Tensor ry = at::bmm(x, direction.transpose(1, 2));
      if (rx.defined()) ry.add_(times_weight_transposed(rx, weight));
      if (bias_) ry.add_(param_view(p.tangent, b_off_, {out_}).unsqueeze(1));
      rx = ry;
    }
    x = y;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const auto gy_t = gy.transpose(1, 2);
    write_param(p.grad, w_off_, at::bmm(gy_t, x_));
    if (bias_) write_param(p.grad, b_off_, gy.sum(1));
    const auto weight = param_view(p.theta, w_off_, {out_, in_});
    at::Tensor gx = need_input_grad ? times_weight(gy, weight) : at::Tensor();
    if (p.carries_tangent()) {
      // R{gW} = R{gy}ᵀ x + gyᵀ R{x};  R{gb} = Σ R{gy};  R{gx} = R{gy} W + gy V
      at::Tensor rgw = at::bmm(rgy.transpose(1, 2), x_);
      if (rx_.defined()) rgw.baddbmm_(gy_t, rx_);
      write_param(p.grad_tangent, w_off_, rgw);
      if (bias_) write_param(p.grad_tangent, b_off_, rgy.sum(1));
      if (need_input_grad) {
        const auto direction = param_view(p.tangent, w_off_, {out_, in_});
        rgy = times_weight(rgy, weight).baddbmm_(gy, direction);
      }
    }
    gy = gx;
    x_ = rx_ = at::Tensor();
  }

 private:
  // x Wᵀ per task; one large matrix product where all tasks share W.
  static at::Tensor times_weight_transposed(const at::Tensor& x, const at::Tensor& weight) {
    if (shared_across_tasks(weight)) {
      const auto flat = x.reshape({-1, x.size(2)});
      return at::mm(flat, weight.select(0, 0).t()).view({x.size(0), x.size(1), weight.size(1)});
    }
    return at::bmm(x, weight.transpose(1, 2));
  }

  static at::Tensor times_weight(const at::Tensor& g, const at::Tensor& weight) {
    if (shared_across_tasks(weight)) {
      const auto flat = g.reshape({-1, g.size(2)});
      return at::mm(flat, weight.select(0, 0)).view({g.size(0), g.size(1), weight.size(2)});
    }
    return at::bmm(g, weight);
  }

  int64_t in_, out_;
  bool bias_;
  int64_t w_off_, b_off_;
  at::Tensor x_, rx_;
};

// Image activations are kept sample-major, [N, T, C, H, W], stored channels-last (N, H, W, T·C in
// memory). Viewed as [N, T·C, H, W] without a copy, the T per-task convolutions are one grouped
// convolution (task_conv2d: oneDNN with groups = T on the CPU, an implicit GEMM over all tasks on
// CUDA) and the per-task batch norms one batch norm over T·C channels (task_batch_norm). On the
// CPU channels-last is also oneDNN's own format: measured on the Omniglot shapes, NCHW cost a
// reorder per call and made max-pooling 3-7x slower.
at::Tensor grouped(const at::Tensor& x) {
  return x.reshape({x.size(0), x.size(1) * x.size(2), x.size(3), x.size(4)});
}

at::Tensor channels_last(const at::Tensor& x) {
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

// The T per-task convolutions are one op, maml_ext::task_conv2d (task_conv.h): a grouped ATen
// convolution on CPU, the fused implicit-product kernels on CUDA.
class Conv2d final : public Layer {
 public:
  Conv2d(int64_t in, int64_t out, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
         int64_t pw, bool bias, int64_t weight_offset, int64_t bias_offset)
      : in_(in), out_(out), kernel_{kh, kw}, stride_{sh, sw}, padding_{ph, pw}, bias_(bias),
        w_off_(weight_offset), b_off_(bias_offset) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == in_, "x", "Conv2d expects inputs with ", in_,
                   " channels [T, N, ", in_, ", H, W], got [N, T, C, H, W] = ", x.sizes());
    x_ = x;
    rx_ = rx;
    const bool tangent = p.carries_tangent();
    // R{y} = conv(R{x}, W) + conv(x, V) + v_b
    const auto w = weights(p.theta), v = tangent ? weights(p.tangent) : at::Tensor();
    const auto b = bias(p.theta), vb = tangent ? bias(p.tangent) : at::Tensor();
    at::Tensor y, ry;
    if (statistics_slot_ != nullptr && x.is_cuda()) {
      // The kernel's epilogue summarises y for the batch norm that follows: [P, T, O, 5] as its
      // [P, 1, T·O, 5].
      at::Tensor partials;
      std::tie(y, ry, partials) =
          task_conv2d_with_statistics(x, rx, w, v, b, vb, stride_, padding_);
      *statistics_slot_ = partials.view({partials.size(0), 1, -1, partials.size(3)});
    } else {
      std::tie(y, ry) = task_conv2d(x, rx, w, v, b, vb, stride_, padding_);
    }
    if (tangent) rx = ry;
    x = y;
  }

  int64_t out_channels() const { return out_; }

  // A spatial batch norm directly after this layer takes its statistics from this layer's
  // epilogue on CUDA (the CPU keeps oneDNN's convolution and the batch norm's own passes).
  void hand_statistics_to(at::Tensor* slot) { statistics_slot_ = slot; }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const bool tangent = p.carries_tangent();
    // R{gx} = conv_input_grad(R{gy}, W) + conv_input_grad(gy, V)
    // R{gW} = conv_weight_grad(x, R{gy}) + conv_weight_grad(R{x}, gy);  R{gb} = Σ R{gy}
    auto [gx, rgx, gw, rgw, gb, rgb] = task_conv2d_backward(
        gy, tangent ? rgy : at::Tensor(), x_, rx_, weights(p.theta),
        tangent ? weights(p.tangent) : at::Tensor(), stride_, padding_, need_input_grad, bias_);
    write_param(p.grad, w_off_, gw);
    if (bias_) write_param(p.grad, b_off_, gb);
    if (tangent) {
      write_param(p.grad_tangent, w_off_, rgw);
      if (bias_) write_param(p.grad_tangent, b_off_, rgb);
      rgy = need_input_grad ? rgx : at::Tensor();
    }
    gy = need_input_grad ? gx : at::Tensor();
    x_ = rx_ = at::Tensor();
  }

 private:
  at::Tensor weights(const at::Tensor& flat) const {
    return param_view(flat, w_off_, {out_, in_, kernel_[0], kernel_[1]});
  }

  at::Tensor bias(const at::Tensor& flat) const {
    return bias_ ? param_view(flat, b_off_, {out_}) : at::Tensor();
  }

  int64_t in_, out_;
  std::array<int64_t, 2> kernel_, stride_, padding_;
  bool bias_;
  int64_t w_off_, b_off_;
  at::Tensor x_, rx_;
  at::Tensor* statistics_slot_ = nullptr;  // the following batch norm's, if it takes them
};

class MaxPool2d final : public Layer {
 public:
  MaxPool2d(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool ceil_mode)
      : kernel_{kh, kw}, stride_{sh, sw}, padding_{ph, pw}, ceil_mode_(ceil_mode) {}

  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 5, "x", "MaxPool2d expects image inputs [T, N, C, H, W], got ",
                   x.sizes());
    input_ = channels_last(grouped(x));
    auto [y, indices] = at::max_pool2d_with_indices(input_, kernel_, stride_, padding_, {1, 1},
                                                    ceil_mode_);
    indices_ = indices;
    output_sizes_ = {x.size(0), x.size(1), x.size(2), y.size(2), y.size(3)};
    if (rx.defined()) {
      // R{y} = R{x}[argmax]
      rx = grouped(rx).flatten(2).gather(2, indices_.flatten(2)).reshape(output_sizes_);
    }
    x = y.view(output_sizes_);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    const std::vector<int64_t> input_sizes{output_sizes_[0], output_sizes_[1], output_sizes_[2],
                                     input_.size(2), input_.size(3)};
    gy = scatter(gy).view(input_sizes);
    if (p.carries_tangent() && rgy.defined()) rgy = scatter(rgy).view(input_sizes);
    input_ = indices_ = at::Tensor();
  }

 private:
  at::Tensor scatter(const at::Tensor& g) const {
    return at::max_pool2d_with_indices_backward(channels_last(grouped(g)), input_, kernel_, stride_,
                                                padding_, {1, 1}, ceil_mode_, indices_);
  }

  std::array<int64_t, 2> kernel_, stride_, padding_;
  bool ceil_mode_;
  std::vector<int64_t> output_sizes_;
  at::Tensor input_, indices_;
};

// Transductive batch norm: each task's own batch statistics, per channel, with the ReLU that
// follows it, and on CUDA a 2×2 max-pool after that, fused into its epilogue (Program fuses them).
// All tasks' channels are one maml_ext::task_batch_norm (or task_batch_norm_relu_max_pool) call
// (csrc/batch_norm.h; CPU and CUDA kernels), which carries the tangent (TANGENTS.md) through
// forward and backward. Images [N, T, C, H, W], stored N, H, W, T·C, are its x [1, N·H·W, T·C]
// (pooled: [N, H, W, T·C]) without a copy; features [T, N, C] are its x [T, N, C]. On CUDA, right
// after a convolution, its statistics come from the convolution's epilogue (partial statistics
// merged per channel) instead of two passes over x.
class BatchNorm final : public Layer {
 public:
  BatchNorm(int64_t channels, bool spatial, bool affine, int64_t weight_offset,
            int64_t bias_offset, double eps)
      : channels_(channels), spatial_(spatial), affine_(affine), w_off_(weight_offset),
        b_off_(bias_offset), eps_(eps) {}

  // Where the convolution before this layer leaves its output's partial statistics for the next
  // forward (consumed there).
  at::Tensor* partial_statistics_slot() { return &partial_statistics_; }

  bool relu_fused() const { return relu_; }
  void fuse_relu() { relu_ = true; }

  // Takes over the max-pool that follows the fused ReLU where the kernel covers it: 2×2 windows,
  // stride 2, no padding. Returns whether it did. CUDA tensors run the fused kernel; CPU tensors
  // run ATen's pool after this layer's own epilogue (there the fused kernel measured slower).
  bool fuse_max_pool(const std::array<int64_t, 2>& kernel, const std::array<int64_t, 2>& stride,
                     const std::array<int64_t, 2>& padding, bool ceil_mode) {
    if (!spatial_ || !relu_ || pool_ || kernel != std::array<int64_t, 2>{2, 2} ||
        stride != std::array<int64_t, 2>{2, 2} || padding != std::array<int64_t, 2>{0, 0}) {
      return false;
    }
    pool_ = std::make_unique<MaxPool2d>(2, 2, 2, 2, 0, 0, ceil_mode);
    ceil_mode_ = ceil_mode;
    return true;
  }

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    if (spatial_) {
      MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == channels_, "x", "BatchNorm2d expects inputs with ",
                     channels_, " channels [T, N, ", channels_, ", H, W], got [N, T, C, H, W] = ",
                     x.sizes());
    } else {
      MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == channels_, "x", "BatchNorm1d expects inputs [T, N, ",
                     channels_, "], got ", x.sizes());
    }
    input_sizes_ = x.sizes().vec();
    tasks_ = spatial_ ? x.size(1) : x.size(0);
    fused_pool_ = pool_ != nullptr && x.is_cuda();
    x_ = to_kernel(x);
    rx_ = rx.defined() ? to_kernel(rx) : at::Tensor();
    const bool tangent = p.carries_tangent();
    const auto weight = channel_param(p.theta, w_off_), bias = channel_param(p.theta, b_off_);
    const auto weight_tangent = tangent ? channel_param(p.tangent, w_off_) : at::Tensor();
    const auto bias_tangent = tangent ? channel_param(p.tangent, b_off_) : at::Tensor();
    at::Tensor y, ry, rx_mean, r_sigma;
    const auto partials = std::exchange(partial_statistics_, at::Tensor());
    if (fused_pool_) {
      std::tie(y, ry, argmax_, mean_, invstd_, rx_mean, r_sigma) = task_batch_norm_relu_max_pool(
          x_, rx_, weight, bias, weight_tangent, bias_tangent, eps_, ceil_mode_, partials);
      output_sizes_ = {input_sizes_[0], input_sizes_[1], input_sizes_[2], y.size(1), y.size(2)};
    } else {
      std::tie(y, ry, mean_, invstd_, rx_mean, r_sigma) = task_batch_norm(
          x_, rx_, weight, bias, weight_tangent, bias_tangent, eps_, relu_, partials);
      output_sizes_ = input_sizes_;
    }
    rx_mean_ = rx_.defined() ? rx_mean : at::Tensor();
    r_sigma_ = rx_.defined() ? r_sigma : at::Tensor();
    y_ = relu_ ? y : at::Tensor();  // the fused ReLU's mask (and the pool's output), for the backward
    rx = rx_.defined() || (tangent && affine_) ? from_kernel(ry, output_sizes_) : at::Tensor();
    x = from_kernel(y, output_sizes_);
    if (pool_ != nullptr && !fused_pool_) pool_->forward(p, x, rx);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    if (pool_ != nullptr && !fused_pool_) pool_->backward(p, gy, rgy, true);
    const bool tangent = p.carries_tangent();
    const auto gyk = to_kernel(gy);
    at::Tensor rgyk;
    if (tangent) rgyk = rgy.defined() ? to_kernel(rgy) : at::zeros_like(gyk);
    const auto weight = channel_param(p.theta, w_off_);
    const auto weight_tangent = tangent ? channel_param(p.tangent, w_off_) : at::Tensor();
    auto [gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent] =
        fused_pool_ ? task_batch_norm_relu_max_pool_backward(gyk, rgyk, x_, rx_, weight, weight_tangent,
                                                       mean_, invstd_, rx_mean_, r_sigma_, y_,
                                                       argmax_, need_input_grad)
              : task_batch_norm_backward(gyk, rgyk, x_, rx_, weight, weight_tangent, mean_,
                                         invstd_, rx_mean_, r_sigma_, y_, need_input_grad);
    if (affine_) {
      write_param(p.grad, w_off_, grad_weight);
      write_param(p.grad, b_off_, grad_bias);
      if (tangent) {
        write_param(p.grad_tangent, w_off_, grad_weight_tangent);
        write_param(p.grad_tangent, b_off_, grad_bias_tangent);
      }
    }
    gy = need_input_grad ? from_kernel(gx, input_sizes_) : at::Tensor();
    rgy = need_input_grad && tangent ? from_kernel(rgx, input_sizes_) : at::Tensor();
    x_ = rx_ = mean_ = invstd_ = rx_mean_ = r_sigma_ = y_ = argmax_ = at::Tensor();
  }

 private:
  // [T, C] parameters as the kernel's [B, C]: [1, T·C] for images, [T, C] for features.
  // Undefined without affine (γ = 1, β = 0).
  at::Tensor channel_param(const at::Tensor& flat, int64_t offset) const {
    if (!affine_) return at::Tensor();
    const auto param = param_view(flat, offset, {channels_}).expand({tasks_, channels_});
    return spatial_ ? param.reshape({1, tasks_ * channels_}) : param;
  }

  // Images [N, T, C, H, W] as the kernels' [N, H, W, T·C] (fused pool) or [1, N·H·W, T·C].
  at::Tensor to_kernel(const at::Tensor& t) const {
    if (!spatial_) return t;
    const auto images = grouped(t).permute({0, 2, 3, 1});
    return fused_pool_ ? images : images.reshape({1, -1, images.size(3)});
  }

  // The kernels' output back as [N, T, C, H, W] of `sizes`.
  at::Tensor from_kernel(const at::Tensor& k, const std::vector<int64_t>& sizes) const {
    if (!spatial_) return k;
    return k.view({sizes[0], sizes[3], sizes[4], sizes[1] * sizes[2]})
        .permute({0, 3, 1, 2})
        .view(sizes);
  }

  int64_t channels_;
  bool spatial_, affine_;
  int64_t w_off_, b_off_;
  double eps_;
  bool relu_ = false, ceil_mode_ = false, fused_pool_ = false;
  std::unique_ptr<MaxPool2d> pool_;  // the max-pool taken over, if any
  int64_t tasks_ = 0;
  std::vector<int64_t> input_sizes_, output_sizes_;
  at::Tensor x_, rx_, mean_, invstd_, rx_mean_, r_sigma_, y_, argmax_;
  at::Tensor partial_statistics_;  // from the convolution before, for one forward
};

class ReLU final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    y_ = at::relu(x);
    // threshold_backward(t, y, 0) keeps t where y > 0: the ReLU mask, without storing one.
    if (rx.defined()) rx = at::threshold_backward(rx, y_, 0);
    x = y_;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = at::threshold_backward(gy, y_, 0);
    if (p.carries_tangent() && rgy.defined()) rgy = at::threshold_backward(rgy, y_, 0);
    y_ = at::Tensor();
  }

 private:
  at::Tensor y_;
};

// Images [N, T, C, H, W] (sample-major) become task-major features [T, N, C·H·W].
class Flatten final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    input_sizes_ = x.sizes().vec();
    x = flatten(x);
    if (rx.defined()) rx = flatten(rx);
  }

  void backward(const PassParams&, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = unflatten(gy);
    if (rgy.defined()) rgy = unflatten(rgy);
  }

 private:
  at::Tensor flatten(const at::Tensor& x) const {
    if (x.dim() == 5) return x.transpose(0, 1).reshape({x.size(1), x.size(0), -1});
    return x.reshape({x.size(0), x.size(1), -1});
  }

  at::Tensor unflatten(const at::Tensor& g) const {
    if (input_sizes_.size() == 5) {
      return g.view({input_sizes_[1], input_sizes_[0], input_sizes_[2], input_sizes_[3], input_sizes_[4]})
          .transpose(0, 1)
          .contiguous();
    }
    return g.reshape(input_sizes_);
  }

  std::vector<int64_t> input_sizes_;
};

// Reads the int[] description one record at a time, with a clear error where it runs short.
class ProgramReader {
 public:
  explicit ProgramReader(at::IntArrayRef ints) : ints_(ints) {}
  bool done() const { return position_ >= ints_.size(); }
  int64_t next(const char* what) {
    MAML_CHECK_ARG(position_ < ints_.size(), "program", "description ends before ", what,
                   " of layer record ", record_);
    return ints_[position_++];
  }
  void start_record() { ++record_; }

 private:
  at::IntArrayRef ints_;
  size_t position_ = 0;
  int64_t record_ = -1;
};

// The fields of one layer record after its kind (maml_ext/program.py writes them), read in one
// place for the layer builder (Program) and the parameter slices.
struct LinearRecord {
  int64_t in, out;
  bool bias;
  int64_t weight_offset, bias_offset;
};

LinearRecord read_linear(ProgramReader& reader) {
  LinearRecord r{};
  r.in = reader.next("in_features");
  r.out = reader.next("out_features");
  r.bias = reader.next("has_bias") != 0;
  r.weight_offset = reader.next("weight offset");
  r.bias_offset = reader.next("bias offset");
  return r;
}

struct BatchNormRecord {
  int64_t channels;
  bool spatial, affine;
  int64_t weight_offset, bias_offset;
};

BatchNormRecord read_batch_norm(ProgramReader& reader) {
  BatchNormRecord r{};
  r.channels = reader.next("channels");
  r.spatial = reader.next("spatial") != 0;
  r.affine = reader.next("affine") != 0;
  r.weight_offset = reader.next("weight offset");
  r.bias_offset = reader.next("bias offset");
  return r;
}

// Calls on_record(kind, reader) for each layer record of a program description, its kind read.
template <typename OnRecord>
void for_each_record(at::IntArrayRef ints, const OnRecord& on_record) {
  ProgramReader reader(ints);
  while (!reader.done()) {
    reader.start_record();
    const int64_t kind = reader.next("the layer kind");
    on_record(kind, reader);
  }
}

// Conv2d: in, out, kernel h, w, stride h, w, padding h, w, has_bias, weight offset, bias offset.
// MaxPool2d: kernel h, w, stride h, w, padding h, w, ceil_mode.
template <size_t N>
std::array<int64_t, N> read_fields(ProgramReader& reader, const char* what) {
  std::array<int64_t, N> v{};
  for (auto& value : v) value = reader.next(what);
  return v;
}

// Images travel sample-major inside the program ([N, T, C, H, W] stored as N, H, W, T, C; see
// Conv2d); the program's inputs and outputs are task-major ([T, N, ...]).
at::Tensor to_sample_major(const at::Tensor& x) {
  if (x.dim() != 5) return x;
  return x.permute({1, 3, 4, 0, 2}).contiguous().permute({0, 3, 4, 1, 2});
}

at::Tensor to_task_major(const at::Tensor& x) {
  return x.dim() == 5 ? x.transpose(0, 1).contiguous() : x;
}

}  // namespace

std::vector<ParameterSlice> parameter_slices(at::IntArrayRef ints) {
  std::vector<ParameterSlice> slices;
  for_each_record(ints, [&](int64_t kind, ProgramReader& reader) {
    switch (static_cast<LayerKind>(kind)) {
      case LayerKind::kLinear: {
        const auto r = read_linear(reader);
        slices.push_back({r.weight_offset, r.in * r.out});
        if (r.bias) slices.push_back({r.bias_offset, r.out});
        break;
      }
      case LayerKind::kConv2d: {
        const auto v = read_fields<11>(reader, "a Conv2d field");
        slices.push_back({v[9], v[0] * v[1] * v[2] * v[3]});
        if (v[8] != 0) slices.push_back({v[10], v[1]});
        break;
      }
      case LayerKind::kBatchNorm: {
        const auto r = read_batch_norm(reader);
        if (r.affine) {
          slices.push_back({r.weight_offset, r.channels});
          slices.push_back({r.bias_offset, r.channels});
        }
        break;
      }
      case LayerKind::kMaxPool2d:
        read_fields<7>(reader, "a MaxPool2d field");
        break;
      case LayerKind::kReLU:
      case LayerKind::kFlatten:
        break;
      default:
        MAML_CHECK_ARG(false, "program", "unknown layer kind ", kind);
    }
  });
  return slices;
}

Program::Program(at::IntArrayRef ints, at::ArrayRef<double> floats, int64_t loss,
                 int64_t num_params)
    : num_params_(num_params) {
  MAML_CHECK_ARG(loss == static_cast<int64_t>(LossKind::kCrossEntropy) ||
                     loss == static_cast<int64_t>(LossKind::kMeanSquaredError),
                 "loss", "expected 1 (cross-entropy) or 2 (mean-squared error), got ", loss);
  loss_ = static_cast<LossKind>(loss);
  size_t float_index = 0;
  for_each_record(ints, [&](int64_t kind, ProgramReader& reader) {
    switch (static_cast<LayerKind>(kind)) {
      case LayerKind::kLinear: {
        const auto r = read_linear(reader);
        layers_.push_back(
            std::make_unique<Linear>(r.in, r.out, r.bias, r.weight_offset, r.bias_offset));
        break;
      }
      case LayerKind::kConv2d: {
        const auto v = read_fields<11>(reader, "a Conv2d field");
        layers_.push_back(std::make_unique<Conv2d>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
                                                   v[8] != 0, v[9], v[10]));
        break;
      }
      case LayerKind::kBatchNorm: {
        const auto r = read_batch_norm(reader);
        MAML_CHECK_ARG(float_index < floats.size(), "program_floats",
                       "expected an eps for every BatchNorm layer, got ", floats.size());
        auto norm = std::make_unique<BatchNorm>(r.channels, r.spatial, r.affine, r.weight_offset,
                                                r.bias_offset, floats[float_index++]);
        // A 2-d batch norm right after a convolution takes its statistics from the convolution.
        auto* conv = layers_.empty() ? nullptr : dynamic_cast<Conv2d*>(layers_.back().get());
        if (conv != nullptr && r.spatial && conv->out_channels() == r.channels) {
          conv->hand_statistics_to(norm->partial_statistics_slot());
        }
        layers_.push_back(std::move(norm));
        break;
      }
      case LayerKind::kReLU: {
        // A ReLU right after a batch norm runs in the batch norm's epilogue.
        auto* norm = layers_.empty() ? nullptr : dynamic_cast<BatchNorm*>(layers_.back().get());
        if (norm != nullptr && !norm->relu_fused()) {
          norm->fuse_relu();
        } else {
          layers_.push_back(std::make_unique<ReLU>());
        }
        break;
      }
      case LayerKind::kMaxPool2d: {
        const auto v = read_fields<7>(reader, "a MaxPool2d field");
        // A 2×2 max-pool after a batch norm's fused ReLU runs in the same epilogue.
        auto* norm = layers_.empty() ? nullptr : dynamic_cast<BatchNorm*>(layers_.back().get());
        if (norm == nullptr || !norm->fuse_max_pool({v[0], v[1]}, {v[2], v[3]}, {v[4], v[5]}, v[6] != 0)) {
          layers_.push_back(std::make_unique<MaxPool2d>(v[0], v[1], v[2], v[3], v[4], v[5], v[6] != 0));
        }
        break;
      }
      case LayerKind::kFlatten:
        layers_.push_back(std::make_unique<Flatten>());
        break;
      default:
        MAML_CHECK_ARG(false, "program", "unknown layer kind ", kind);
    }
  });
  MAML_CHECK_ARG(!layers_.empty(), "program", "expected at least one layer");
  auto slices = parameter_slices(ints);
  for (const auto& slice : slices) {
    MAML_CHECK_ARG(slice.offset >= 0 && slice.offset + slice.numel <= num_params, "program",
                   "parameter slice [", slice.offset, ", ", slice.offset + slice.numel,
                   ") lies outside the ", num_params, " parameters");
  }
  std::sort(slices.begin(), slices.end(), [](const auto& a, const auto& b) {
    return std::tie(a.offset, a.numel) < std::tie(b.offset, b.numel);
  });
  int64_t covered = 0;
  for (const auto& slice : slices) {
    MAML_CHECK_ARG(slice.offset == covered, "program", "parameter slices must tile [0, ",
                   num_params, ") without gaps or overlaps; found one starting at ", slice.offset,
                   " after ", covered);
    covered = slice.offset + slice.numel;
  }
  MAML_CHECK_ARG(covered == num_params, "program", "parameter slices cover ", covered, " of ",
                 num_params, " parameters");
}

at::Tensor Program::forward(const at::Tensor& theta, const at::Tensor& x) {
  PassParams p{theta, at::Tensor(), at::Tensor(), at::Tensor()};
  at::Tensor h = to_sample_major(x), rh;
  for (auto& layer : layers_) layer->forward(p, h, rh);
  return to_task_major(h);
}

LossValue Program::gradient(const PassParams& p, const at::Tensor& x, const at::Tensor& y) {
  at::Tensor z = to_sample_major(x), rz;
  for (auto& layer : layers_) layer->forward(p, z, rz);
  const bool image_output = z.dim() == 5;
  z = to_task_major(z);
  if (rz.defined()) rz = to_task_major(rz);
  if (p.carries_tangent() && !rz.defined()) rz = at::zeros_like(z);

  const int64_t tasks = z.size(0), rows = z.size(1);
  LossValue value;
  at::Tensor gz, rgz;
  if (loss_ == LossKind::kCrossEntropy) {
    MAML_CHECK_ARG(z.dim() == 3, "model", "cross-entropy needs outputs [T, N, classes], got ",
                   z.sizes());
    const int64_t classes = z.size(2);
    auto [loss_rows, correct, grad, grad_tangent] = softmax_cross_entropy(
        z.reshape({tasks * rows, classes}), y.reshape({tasks * rows}),
        rz.defined() ? rz.reshape({tasks * rows, classes}) : at::Tensor());
    value.loss = loss_rows.view({tasks, rows}).mean(1);
    value.accuracy = correct.view({tasks, rows}).mean(1);
    const double scale = 1.0 / static_cast<double>(rows);  // the loss is a mean over rows
    gz = grad.view(z.sizes()).mul_(scale);
    if (rz.defined()) rgz = grad_tangent.view(z.sizes()).mul_(scale);
  } else {
    MAML_CHECK_ARG(y.sizes() == z.sizes(), "y", "expected targets shaped like the outputs ",
                   z.sizes(), ", got ", y.sizes());
    const double scale = 2.0 / static_cast<double>(z.numel() / tasks);
    auto diff = z - y;
    value.loss = diff.square().reshape({tasks, -1}).mean(1);
    gz = diff.mul_(scale);
    if (rz.defined()) rgz = rz * scale;
  }

  if (image_output) {
    gz = to_sample_major(gz);
    if (rgz.defined()) rgz = to_sample_major(rgz);
  }
  for (size_t i = layers_.size(); i-- > 0;) layers_[i]->backward(p, gz, rgz, i > 0);
  return value;
}

}  // namespace maml_ext
