#include "layers.h"

#include <algorithm>
#include <utility>

#include "checks.h"
#include "softmax_cross_entropy.h"

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

// Per-task convolutions run as one grouped convolution: [T, N, C, H, W] becomes [N, T·C, H, W]
// and the T weight tensors one [T·O, C, kh, kw] weight with groups = T.
class Conv2d final : public Layer {
 public:
  Conv2d(int64_t in, int64_t out, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
         int64_t pw, bool bias, int64_t weight_offset, int64_t bias_offset)
      : in_(in), out_(out), kernel_{kh, kw}, stride_{sh, sw}, padding_{ph, pw}, bias_(bias),
        w_off_(weight_offset), b_off_(bias_offset) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    MAML_CHECK_ARG(x.dim() == 5 && x.size(2) == in_, "x", "Conv2d expects task-batched inputs [T, N, ",
                   in_, ", H, W], got shape ", x.sizes());
    tasks_ = x.size(0);
    input_sizes_ = x.sizes().vec();
    const auto weight = param_view(p.theta, w_off_, weight_shape());
    const auto bias = bias_ ? param_view(p.theta, b_off_, {out_}) : at::Tensor();
    x_grouped_ = to_grouped(x);
    rx_grouped_ = rx.defined() ? to_grouped(rx) : at::Tensor();
    at::Tensor y = convolve(x, x_grouped_, weight, bias);
    if (p.carries_tangent()) {
      // R{y} = conv(R{x}, W) + conv(x, V) + v_b
      const auto direction = param_view(p.tangent, w_off_, weight_shape());
      const auto bias_direction = bias_ ? param_view(p.tangent, b_off_, {out_}) : at::Tensor();
      at::Tensor ry = convolve(x, x_grouped_, direction, bias_direction);
      if (rx.defined()) ry.add_(convolve(rx, rx_grouped_, weight, at::Tensor()));
      rx = ry;
    }
    x = y;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const auto weight = grouped_weight(param_view(p.theta, w_off_, weight_shape()));
    const auto gy_grouped = to_grouped(gy);
    grouped_out_ = tasks_ * out_;
    const auto bias_sizes = bias_ ? at::OptionalIntArrayRef(at::IntArrayRef(&grouped_out_, 1))
                                  : at::OptionalIntArrayRef();
    auto [gx, gw, gb] = convolution_backward(gy_grouped, x_grouped_, weight, bias_sizes,
                                             {need_input_grad, true, bias_});
    write_param(p.grad, w_off_, gw);
    if (bias_) write_param(p.grad, b_off_, gb);
    if (p.carries_tangent()) {
      // R{gx} = conv_input_grad(R{gy}, W) + conv_input_grad(gy, V)
      // R{gW} = conv_weight_grad(x, R{gy}) + conv_weight_grad(R{x}, gy);  R{gb} = Σ R{gy}
      auto [rgx, rgw, rgb] = convolution_backward(to_grouped(rgy), x_grouped_, weight, bias_sizes,
                                                  {need_input_grad, true, bias_});
      const bool has_rx = rx_grouped_.defined();
      if (need_input_grad || has_rx) {
        const auto direction = grouped_weight(param_view(p.tangent, w_off_, weight_shape()));
        auto [rgx_v, rgw_rx, unused] =
            convolution_backward(gy_grouped, has_rx ? rx_grouped_ : x_grouped_, direction,
                                 at::OptionalIntArrayRef(), {need_input_grad, has_rx, false});
        if (need_input_grad) rgx.add_(rgx_v);
        if (has_rx) rgw.add_(rgw_rx);
      }
      write_param(p.grad_tangent, w_off_, rgw);
      if (bias_) write_param(p.grad_tangent, b_off_, rgb);
      rgy = need_input_grad ? from_grouped(rgx) : at::Tensor();
    }
    gy = need_input_grad ? from_grouped(gx) : at::Tensor();
    x_grouped_ = rx_grouped_ = at::Tensor();
  }

 private:
  std::vector<int64_t> weight_shape() const { return {out_, in_, kernel_[0], kernel_[1]}; }

  static at::Tensor to_grouped(const at::Tensor& x) {
    return x.transpose(0, 1).reshape({x.size(1), x.size(0) * x.size(2), x.size(3), x.size(4)});
  }

  at::Tensor from_grouped(const at::Tensor& g) const {
    const int64_t channels = g.size(1) / tasks_;
    return g.view({g.size(0), tasks_, channels, g.size(2), g.size(3)}).transpose(0, 1).contiguous();
  }

  at::Tensor grouped_weight(const at::Tensor& weight) const {
    return weight.expand({tasks_, out_, in_, kernel_[0], kernel_[1]})
        .reshape({tasks_ * out_, in_, kernel_[0], kernel_[1]});
  }

  // Convolution of task-batched x with per-task (or shared) weight and optional bias.
  at::Tensor convolve(const at::Tensor& x, const at::Tensor& x_grouped, const at::Tensor& weight,
                      const at::Tensor& bias) const {
    if (shared_across_tasks(weight)) {
      const auto flat = x.reshape({-1, x.size(2), x.size(3), x.size(4)});
      const auto y = at::convolution(flat, weight.select(0, 0),
                                     bias.defined() ? bias.select(0, 0) : at::Tensor(), stride_,
                                     padding_, {1, 1}, false, {0, 0}, 1);
      return y.view({tasks_, x.size(1), out_, y.size(2), y.size(3)});
    }
    const auto y = at::convolution(x_grouped, grouped_weight(weight),
                                   bias.defined() ? bias.reshape({-1}) : at::Tensor(), stride_,
                                   padding_, {1, 1}, false, {0, 0}, tasks_);
    return from_grouped(y);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
      const at::Tensor& gy_grouped, const at::Tensor& x_grouped, const at::Tensor& weight,
      at::OptionalIntArrayRef bias_sizes, std::array<bool, 3> mask) const {
    return at::convolution_backward(gy_grouped, x_grouped, weight, bias_sizes, stride_, padding_,
                                    {1, 1}, false, {0, 0}, tasks_, mask);
  }

  int64_t in_, out_;
  std::array<int64_t, 2> kernel_, stride_, padding_;
  bool bias_;
  int64_t w_off_, b_off_;
  int64_t tasks_ = 0, grouped_out_ = 0;
  std::vector<int64_t> input_sizes_;
  at::Tensor x_grouped_, rx_grouped_;
};

// Transductive batch norm: each task's own batch statistics, per channel.
class BatchNorm final : public Layer {
 public:
  BatchNorm(int64_t channels, bool spatial, bool affine, int64_t weight_offset,
            int64_t bias_offset, double eps)
      : channels_(channels), spatial_(spatial), affine_(affine), w_off_(weight_offset),
        b_off_(bias_offset), eps_(eps) {}

  void forward(const PassParams& p, at::Tensor& x, at::Tensor& rx) override {
    const int64_t expected_dim = spatial_ ? 5 : 3;
    MAML_CHECK_ARG(x.dim() == expected_dim && x.size(2) == channels_, "x", "BatchNorm",
                   spatial_ ? "2d" : "1d", " expects task-batched inputs [T, N, ", channels_,
                   spatial_ ? ", H, W" : "", "], got shape ", x.sizes());
    dims_ = spatial_ ? std::vector<int64_t>{1, 3, 4} : std::vector<int64_t>{1};
    count_ = x.numel() / (x.size(0) * channels_);
    const auto centred = x - x.mean(dims_, true);
    sigma_ = (centred.square().mean(dims_, true) + eps_).sqrt();
    x_hat_ = centred / sigma_;
    at::Tensor y = affine_ ? at::addcmul(channel_view(p.theta, b_off_), x_hat_,
                                         channel_view(p.theta, w_off_))
                           : x_hat_;
    rx_hat_ = r_sigma_ = at::Tensor();
    if (p.carries_tangent()) {
      // R{x̂} = (R{x} − mean(R{x}) − x̂ mean(x̂ R{x})) / σ;  R{y} = γ R{x̂} + v_γ x̂ + v_β
      at::Tensor ry;
      if (rx.defined()) {
        r_sigma_ = (x_hat_ * rx).mean(dims_, true);
        rx_hat_ = (rx - rx.mean(dims_, true) - x_hat_ * r_sigma_) / sigma_;
        ry = affine_ ? rx_hat_ * channel_view(p.theta, w_off_) : rx_hat_;
      }
      if (affine_) {
        ry = add_tangents(ry, at::addcmul(channel_view(p.tangent, b_off_), x_hat_,
                                          channel_view(p.tangent, w_off_)));
      }
      rx = ry;
    }
    x = y;
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy,
                bool need_input_grad) override {
    const int64_t tasks = gy.size(0);
    const auto sum_gy = gy.sum(dims_, true);
    const auto sum_gy_xhat = (gy * x_hat_).sum(dims_, true);
    if (affine_) {
      write_param(p.grad, w_off_, sum_gy_xhat.view({tasks, channels_}));
      write_param(p.grad, b_off_, sum_gy.view({tasks, channels_}));
    }
    const double inv_count = 1.0 / static_cast<double>(count_);
    const auto mean_gy_xhat = sum_gy_xhat * inv_count;
    // D = gy − mean(gy) − x̂ mean(gy x̂);  gx = (γ/σ) D
    at::Tensor d, gamma_over_sigma;
    if (need_input_grad) {
      d = gy - sum_gy * inv_count - x_hat_ * mean_gy_xhat;
      gamma_over_sigma = affine_ ? channel_view(p.theta, w_off_) / sigma_ : sigma_.reciprocal();
    }
    if (p.carries_tangent()) {
      const auto sum_rgy = rgy.sum(dims_, true);
      auto r_product = rgy * x_hat_;  // R{gy ⊙ x̂} = R{gy} x̂ + gy R{x̂}
      if (rx_hat_.defined()) r_product.addcmul_(gy, rx_hat_);
      const auto sum_r_product = r_product.sum(dims_, true);
      if (affine_) {
        write_param(p.grad_tangent, w_off_, sum_r_product.view({tasks, channels_}));
        write_param(p.grad_tangent, b_off_, sum_rgy.view({tasks, channels_}));
      }
      if (need_input_grad) {
        // R{D} = R{gy} − mean(R{gy}) − R{x̂} mean(gy x̂) − x̂ mean(R{gy} x̂ + gy R{x̂})
        auto r_d = rgy - sum_rgy * inv_count - x_hat_ * (sum_r_product * inv_count);
        if (rx_hat_.defined()) r_d.sub_(rx_hat_ * mean_gy_xhat);
        // R{gx} = (v_γ/σ − γ R{σ}/σ²) D + (γ/σ) R{D}
        at::Tensor coefficient;
        if (affine_) coefficient = channel_view(p.tangent, w_off_) / sigma_;
        if (r_sigma_.defined()) {
          const auto gamma_r_sigma = affine_ ? channel_view(p.theta, w_off_) * r_sigma_ : r_sigma_;
          const auto term = gamma_r_sigma / sigma_.square();
          coefficient = coefficient.defined() ? coefficient - term : -term;
        }
        auto rgx = gamma_over_sigma * r_d;
        if (coefficient.defined()) rgx.addcmul_(coefficient, d);
        rgy = rgx;
      }
    }
    gy = need_input_grad ? gamma_over_sigma * d : at::Tensor();
    x_hat_ = sigma_ = rx_hat_ = r_sigma_ = at::Tensor();
  }

 private:
  // A per-channel parameter [T, C] shaped to broadcast against the activations.
  at::Tensor channel_view(const at::Tensor& flat, int64_t offset) const {
    const auto v = param_view(flat, offset, {channels_});
    return spatial_ ? v.view({v.size(0), 1, channels_, 1, 1}) : v.view({v.size(0), 1, channels_});
  }

  int64_t channels_;
  bool spatial_, affine_;
  int64_t w_off_, b_off_;
  double eps_;
  std::vector<int64_t> dims_;
  int64_t count_ = 0;
  at::Tensor x_hat_, sigma_, rx_hat_, r_sigma_;
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
    MAML_CHECK_ARG(x.dim() == 5, "x", "MaxPool2d expects task-batched inputs [T, N, C, H, W], got shape ",
                   x.sizes());
    input_ = x.reshape({-1, x.size(2), x.size(3), x.size(4)});
    auto [y, indices] = at::max_pool2d_with_indices(input_, kernel_, stride_, padding_, {1, 1},
                                                    ceil_mode_);
    indices_ = indices;
    output_sizes_ = {x.size(0), x.size(1), y.size(1), y.size(2), y.size(3)};
    if (rx.defined()) {
      // R{y} = R{x}[argmax]
      const auto flat_indices = indices_.flatten(2);
      rx = rx.reshape({input_.size(0), input_.size(1), -1})
               .gather(2, flat_indices)
               .view(output_sizes_);
    }
    x = y.view(output_sizes_);
  }

  void backward(const PassParams& p, at::Tensor& gy, at::Tensor& rgy, bool) override {
    std::vector<int64_t> input_sizes{output_sizes_[0], output_sizes_[1], input_.size(1),
                                     input_.size(2), input_.size(3)};
    gy = scatter(gy).view(input_sizes);
    if (p.carries_tangent() && rgy.defined()) rgy = scatter(rgy).view(input_sizes);
    input_ = indices_ = at::Tensor();
  }

 private:
  at::Tensor scatter(const at::Tensor& g) const {
    return at::max_pool2d_with_indices_backward(
        g.reshape({input_.size(0), input_.size(1), g.size(3), g.size(4)}), input_, kernel_, stride_,
        padding_, {1, 1}, ceil_mode_, indices_);
  }

  std::array<int64_t, 2> kernel_, stride_, padding_;
  bool ceil_mode_;
  std::vector<int64_t> output_sizes_;
  at::Tensor input_, indices_;
};

class Flatten final : public Layer {
 public:
  void forward(const PassParams&, at::Tensor& x, at::Tensor& rx) override {
    input_sizes_ = x.sizes().vec();
    x = x.reshape({x.size(0), x.size(1), -1});
    if (rx.defined()) rx = rx.reshape({rx.size(0), rx.size(1), -1});
  }

  void backward(const PassParams&, at::Tensor& gy, at::Tensor& rgy, bool) override {
    gy = gy.reshape(input_sizes_);
    if (rgy.defined()) rgy = rgy.reshape(input_sizes_);
  }

 private:
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
  at::Tensor h = x, rh;
  for (auto& layer : layers_) layer->forward(p, h, rh);
  return h;
}

LossValue Program::gradient(const PassParams& p, const at::Tensor& x, const at::Tensor& y) {
  at::Tensor z = x, rz;
  for (auto& layer : layers_) layer->forward(p, z, rz);
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

  for (size_t i = layers_.size(); i-- > 0;) layers_[i]->backward(p, gz, rgz, i > 0);
  return value;
}

}  // namespace maml_ext
