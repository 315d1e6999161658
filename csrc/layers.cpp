#include "layers.h"

#include <algorithm>
#include <utility>

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

// Adds b to a, where either may be undefined (a zero tangent).
at::Tensor add_tangents(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
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

// Image activations are kept sample-major, [N, T, C, H, W]: viewed as [N, T·C, H, W] without a
// copy, the T per-task convolutions are one grouped convolution (groups = T) and the per-task
// batch norms one batch norm over T·C channels, both native ATen (oneDNN / cuDNN) kernels. They
// are stored channels-last (N, H, W, T·C in memory), the format oneDNN computes in: measured on
// the Omniglot shapes, NCHW cost a reorder per call and made max-pooling 3-7x slower.
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
    auto [y, ry] = task_conv2d(x, rx, weights(p.theta), tangent ? weights(p.tangent) : at::Tensor(),
                               bias(p.theta), tangent ? bias(p.tangent) : at::Tensor(), stride_,
                               padding_);
    if (tangent) rx = ry;
    x = y;
  }

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
};

// Transductive batch norm: each task's own batch statistics, per channel. The T per-task batch
// norms are one batch norm over T·C channels of the grouped view ([N, T·C, ...]), so forward and
// backward are ATen's native kernels; the tangent rules (TANGENTS.md) are written on top of them:
// with unit weight the native backward of g is (g − mean(g) − x̂ mean(g x̂)) / σ, which is both
// R{x̂} (for g = R{x}) and D / σ (for g = gy).
class BatchNorm final : public Layer {
 public:
  BatchNorm(int64_t channels, bool spatial, bool affine, int64_t weight_offset,
            int64_t bias_offset, double eps)
      : channels_(channels), spatial_(spatial), affine_(affine), w_off_(weight_offset),
        b_off_(bias_offset), eps_(eps) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    if (spatial_) {
      MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == channels_, "x", "BatchNorm2d expects inputs with ",
                     channels_, " channels [T, N, ", channels_, ", H, W], got [N, T, C, H, W] = ",
                     x.sizes());
    } else {
      MAML_CHECK_ARG(x.dim() == 3 && x.size(2) == channels_, "x", "BatchNorm1d expects inputs [T, N, ",
                     channels_, "], got ", x.sizes());
    }
    tasks_ = p.tasks();
    input_sizes_ = x.sizes().vec();
    x_ = to_grouped(x);
    count_ = x_.numel() / x_.size(1);
    reduce_dims_ = spatial_ ? std::vector<int64_t>{0, 2, 3} : std::vector<int64_t>{0};
    const auto gamma = affine_ ? channel_param(p.theta, w_off_) : at::Tensor();
    auto [y, mean, invstd] = at::native_batch_norm(
        x_, gamma, affine_ ? channel_param(p.theta, b_off_) : at::Tensor(), {}, {}, true, 0.0, eps_);
    mean_ = mean;
    invstd_ = invstd;
    x_hat_ = rx_hat_ = r_sigma_ = at::Tensor();
    if (p.carries_tangent()) {
      x_hat_ = (x_ - broadcast(mean_)) * broadcast(invstd_);
      // R{x̂} = (R{x} − mean(R{x}) − x̂ mean(x̂ R{x})) / σ;  R{y} = γ R{x̂} + v_γ x̂ + v_β
      at::Tensor ry;
      if (rx.defined()) {
        const auto rxg = to_grouped(rx);
        r_sigma_ = (x_hat_ * rxg).mean(reduce_dims_);  // R{σ} = mean(x̂ R{x})
        rx_hat_ = unit_backward(rxg);
        ry = affine_ ? rx_hat_ * broadcast(gamma) : rx_hat_;
      }
      if (affine_) {
        ry = add_tangents(ry, at::addcmul(broadcast(channel_param(p.tangent, b_off_)), x_hat_,
                                          broadcast(channel_param(p.tangent, w_off_))));
      }
      rx = ry.defined() ? from_grouped(ry) : ry;
    }
    x = from_grouped(y);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const auto gyg = to_grouped(gy);
    const auto gamma = affine_ ? channel_param(p.theta, w_off_) : at::Tensor();
    if (!p.carries_tangent()) {
      auto [gx, ggamma, gbeta] = at::native_batch_norm_backward(
          gyg, x_, gamma, {}, {}, mean_, invstd_, true, eps_, {need_input_grad, affine_, affine_});
      if (affine_) {
        write_param(p.grad, w_off_, ggamma);
        write_param(p.grad, b_off_, gbeta);
      }
      gy = need_input_grad ? from_grouped(gx) : at::Tensor();
      release();
      return;
    }
    const auto rgyg = to_grouped(rgy);
    const double inv_count = 1.0 / static_cast<double>(count_);
    const auto sum_gy_xhat = (gyg * x_hat_).sum(reduce_dims_);
    auto r_product = rgyg * x_hat_;  // R{gy ⊙ x̂} = R{gy} x̂ + gy R{x̂}
    if (rx_hat_.defined()) r_product.addcmul_(gyg, rx_hat_);
    if (affine_) {
      write_param(p.grad, w_off_, sum_gy_xhat);
      write_param(p.grad, b_off_, gyg.sum(reduce_dims_));
      write_param(p.grad_tangent, w_off_, r_product.sum(reduce_dims_));
      write_param(p.grad_tangent, b_off_, rgyg.sum(reduce_dims_));
    }
    if (need_input_grad) {
      // gx = γ E with E = D/σ.  R{gx} = v_γ E − γ (R{σ}/σ) E + γ R{D}/σ, where
      // R{D}/σ = E(R{gy}) − (R{x̂} mean(gy x̂) + x̂ mean(gy R{x̂})) / σ.
      const auto e = unit_backward(gyg);
      auto r_d = unit_backward(rgyg);
      if (rx_hat_.defined()) {
        const auto mean_gy_xhat = broadcast(sum_gy_xhat * inv_count);
        const auto mean_gy_rxhat = broadcast((gyg * rx_hat_).mean(reduce_dims_));
        r_d.sub_((rx_hat_ * mean_gy_xhat + x_hat_ * mean_gy_rxhat) * broadcast(invstd_));
      }
      at::Tensor coefficient;  // v_γ − γ R{σ}/σ, per channel
      if (affine_) coefficient = channel_param(p.tangent, w_off_);
      if (r_sigma_.defined()) {
        const auto term = (affine_ ? gamma * r_sigma_ : r_sigma_) * invstd_;
        coefficient = coefficient.defined() ? coefficient - term : -term;
      }
      auto rgx = affine_ ? r_d * broadcast(gamma) : r_d;
      if (coefficient.defined()) rgx.addcmul_(e, broadcast(coefficient));
      rgy = from_grouped(rgx);
      gy = from_grouped(affine_ ? e * broadcast(gamma) : e);
    } else {
      gy = rgy = at::Tensor();
    }
    release();
  }

 private:
  // [T, C] parameters as the [T·C] channels of the grouped view.
  at::Tensor channel_param(const at::Tensor& flat, int64_t offset) const {
    return param_view(flat, offset, {channels_}).reshape({-1});
  }

  at::Tensor broadcast(const at::Tensor& per_channel) const {
    return spatial_ ? per_channel.view({1, -1, 1, 1}) : per_channel.view({1, -1});
  }

  // (g − mean(g) − x̂ mean(g x̂)) / σ: the native batch-norm backward with unit weight.
  at::Tensor unit_backward(const at::Tensor& g) const {
    return std::get<0>(at::native_batch_norm_backward(g, x_, {}, {}, {}, mean_, invstd_, true, eps_,
                                                      {true, false, false}));
  }

  // Images: [N, T, C, H, W] is already [N, T·C, H, W]. Features [T, N, C] become [N, T·C].
  at::Tensor to_grouped(const at::Tensor& x) const {
    if (spatial_) return grouped(x);
    return x.transpose(0, 1).reshape({x.size(1), x.size(0) * x.size(2)});
  }

  at::Tensor from_grouped(const at::Tensor& g) const {
    if (spatial_) return g.view(input_sizes_);
    return g.view({input_sizes_[1], input_sizes_[0], input_sizes_[2]}).transpose(0, 1).contiguous();
  }

  void release() { x_ = mean_ = invstd_ = x_hat_ = rx_hat_ = r_sigma_ = at::Tensor(); }

  int64_t channels_;
  bool spatial_, affine_;
  int64_t w_off_, b_off_;
  double eps_;
  int64_t tasks_ = 0, count_ = 0;
  std::vector<int64_t> input_sizes_, reduce_dims_;
  at::Tensor x_, mean_, invstd_, x_hat_, rx_hat_, r_sigma_;
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

Program::Program(at::IntArrayRef ints, at::ArrayRef<double> floats, int64_t loss,
                 int64_t num_params)
    : num_params_(num_params) {
  MAML_CHECK_ARG(loss == static_cast<int64_t>(LossKind::kCrossEntropy) ||
                     loss == static_cast<int64_t>(LossKind::kMeanSquaredError),
                 "loss", "expected 1 (cross-entropy) or 2 (mean-squared error), got ", loss);
  loss_ = static_cast<LossKind>(loss);
  std::vector<std::pair<int64_t, int64_t>> slices;  // [begin, end) of every parameter
  auto claim = [&](int64_t offset, int64_t numel) {
    MAML_CHECK_ARG(offset >= 0 && offset + numel <= num_params, "program", "parameter slice [",
                   offset, ", ", offset + numel, ") lies outside the ", num_params,
                   " parameters");
    slices.emplace_back(offset, offset + numel);
  };
  ProgramReader reader(ints);
  size_t float_index = 0;
  while (!reader.done()) {
    reader.start_record();
    const int64_t kind = reader.next("the layer kind");
    switch (static_cast<LayerKind>(kind)) {
      case LayerKind::kLinear: {
        const int64_t in = reader.next("in_features"), out = reader.next("out_features");
        const bool bias = reader.next("has_bias") != 0;
        const int64_t w = reader.next("weight offset"), b = reader.next("bias offset");
        claim(w, in * out);
        if (bias) claim(b, out);
        layers_.push_back(std::make_unique<Linear>(in, out, bias, w, b));
        break;
      }
      case LayerKind::kConv2d: {
        int64_t v[11];
        for (auto& value : v) value = reader.next("a Conv2d field");
        claim(v[9], v[0] * v[1] * v[2] * v[3]);
        if (v[8] != 0) claim(v[10], v[1]);
        layers_.push_back(std::make_unique<Conv2d>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
                                                   v[8] != 0, v[9], v[10]));
        break;
      }
      case LayerKind::kBatchNorm: {
        const int64_t channels = reader.next("channels");
        const bool spatial = reader.next("spatial") != 0, affine = reader.next("affine") != 0;
        const int64_t w = reader.next("weight offset"), b = reader.next("bias offset");
        MAML_CHECK_ARG(float_index < floats.size(), "program_floats",
                       "expected an eps for every BatchNorm layer, got ", floats.size());
        if (affine) {
          claim(w, channels);
          claim(b, channels);
        }
        layers_.push_back(
            std::make_unique<BatchNorm>(channels, spatial, affine, w, b, floats[float_index++]));
        break;
      }
      case LayerKind::kReLU:
        layers_.push_back(std::make_unique<ReLU>());
        break;
      case LayerKind::kMaxPool2d: {
        int64_t v[7];
        for (auto& value : v) value = reader.next("a MaxPool2d field");
        layers_.push_back(std::make_unique<MaxPool2d>(v[0], v[1], v[2], v[3], v[4], v[5], v[6] != 0));
        break;
      }
      case LayerKind::kFlatten:
        layers_.push_back(std::make_unique<Flatten>());
        break;
      default:
        MAML_CHECK_ARG(false, "program", "unknown layer kind ", kind);
    }
  }
  MAML_CHECK_ARG(!layers_.empty(), "program", "expected at least one layer");
  std::sort(slices.begin(), slices.end());
  int64_t covered = 0;
  for (const auto& [begin, end] : slices) {
    MAML_CHECK_ARG(begin == covered, "program", "parameter slices must tile [0, ", num_params,
                   ") without gaps or overlaps; found one starting at ", begin, " after ",
                   covered);
    covered = end;
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
