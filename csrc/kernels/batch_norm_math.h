// Arithmetic of the transductive batch norm (each task's own batch statistics) with an optional
// fused ReLU, forward and backward, each with its tangent (docs/tangent_rules.md, BatchNorm and
// ReLU). Written once for host and device: the CPU kernels (cpu/batch_norm_cpu_kernels.h) and the
// CUDA kernels (cuda/batch_norm_cuda.cu) both call these, so the CPU tests exercise the arithmetic
// the GPU runs.
//
// Per channel over its M values: the kernels accumulate the channel sums with the `*_terms`
// functions (in their own order), turn them into per-channel coefficients with the `*_channel`
// functions, then run the `*_element` functions on every value. Forward: a mean pass, a centred
// pass (variance, and the tangent's sums), an element pass. Backward: a sums pass, an element pass.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace maml_ext {
namespace kernels {

MAML_HOST_DEVICE float sqrt_of(float x) { return sqrtf(x); }
MAML_HOST_DEVICE double sqrt_of(double x) { return ::sqrt(x); }

// The per-channel sums a pass accumulates, one value at a time (each kernel in its own order; the
// sums are references so a kernel keeps them wherever it likes).
template <typename acc_t, typename scalar_t>
MAML_HOST_DEVICE void mean_terms(scalar_t x, acc_t& sum_x) {
  sum_x += static_cast<acc_t>(x);
}

// Σ (x−μ)² and, when the input carries a tangent (kTangent), Σ R{x} and Σ (x−μ) R{x}.
template <bool kTangent, typename acc_t, typename scalar_t>
MAML_HOST_DEVICE void centred_terms(scalar_t x, scalar_t rx, scalar_t mean, acc_t& sum_sq,
                                    acc_t& sum_rx, acc_t& sum_d_rx) {
  const acc_t d = static_cast<acc_t>(x) - static_cast<acc_t>(mean);
  sum_sq += d * d;
  if (kTangent) {
    sum_rx += static_cast<acc_t>(rx);
    sum_d_rx += d * static_cast<acc_t>(rx);
  }
}

// Per-channel forward statistics. x̂ = (x − μ) / σ with σ = sqrt(var + eps) (biased variance);
// the tangent's R{σ} = mean(x̂ R{x}) and mean(R{x}) are what R{x̂} needs per element.
template <typename scalar_t>
struct ForwardStats {
  scalar_t mean, invstd, rx_mean, r_sigma;
};

// The mean alone, from the first pass (the centred pass subtracts it).
template <typename scalar_t, typename acc_t>
MAML_HOST_DEVICE scalar_t mean_channel(acc_t sum_x, int64_t count) {
  return static_cast<scalar_t>(sum_x / static_cast<acc_t>(count));
}

template <bool kTangent, typename scalar_t, typename acc_t>
MAML_HOST_DEVICE ForwardStats<scalar_t> forward_channel(scalar_t mean, acc_t sum_sq, acc_t sum_rx,
                                                        acc_t sum_d_rx, int64_t count, double eps) {
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  const acc_t invstd = acc_t(1) / sqrt_of(sum_sq * inv_count + static_cast<acc_t>(eps));
  ForwardStats<scalar_t> s;
  s.mean = mean;
  s.invstd = static_cast<scalar_t>(invstd);
  s.rx_mean = kTangent ? static_cast<scalar_t>(sum_rx * inv_count) : scalar_t(0);
  s.r_sigma = kTangent ? static_cast<scalar_t>(sum_d_rx * inv_count * invstd) : scalar_t(0);
  return s;
}

template <typename scalar_t>
MAML_HOST_DEVICE scalar_t normalise(scalar_t x, scalar_t mean, scalar_t invstd) {
  return (x - mean) * invstd;
}

// R{x̂} = (R{x} − mean(R{x}) − x̂ R{σ}) / σ
template <typename scalar_t>
MAML_HOST_DEVICE scalar_t normalise_tangent(scalar_t rx, scalar_t x_hat,
                                            const ForwardStats<scalar_t>& s) {
  return (rx - s.rx_mean - x_hat * s.r_sigma) * s.invstd;
}

// The ReLU mask m = [y > 0] applied to t (a value, gradient or tangent); y is the ReLU's output
// or, equivalently, its input.
template <typename scalar_t>
MAML_HOST_DEVICE scalar_t relu_mask(scalar_t t, scalar_t y) {
  return y > scalar_t(0) ? t : scalar_t(0);
}

// Per-channel affine parameters of the forward (γ = 1, β = 0 without affine; the tangents v_γ,
// v_β zero where the direction has none).
template <typename scalar_t>
struct Affine {
  scalar_t weight, bias, weight_tangent, bias_tangent;
};

// y = γ x̂ + β (then ReLU) and, with kTangent, R{y} = (γ R{x̂} + v_γ x̂ + v_β) ⊙ m. rx = 0 where
// the input has no tangent (then stats.rx_mean = stats.r_sigma = 0 and R{x̂} = 0).
template <bool kRelu, bool kTangent, typename scalar_t>
MAML_HOST_DEVICE void forward_element(scalar_t x, scalar_t rx, const ForwardStats<scalar_t>& s,
                                      const Affine<scalar_t>& a, scalar_t* y, scalar_t* ry) {
  const scalar_t x_hat = normalise(x, s.mean, s.invstd);
  const scalar_t out = a.weight * x_hat + a.bias;
  *y = kRelu ? relu_mask(out, out) : out;
  if (kTangent) {
    const scalar_t r_out =
        a.weight * normalise_tangent(rx, x_hat, s) + a.weight_tangent * x_hat + a.bias_tangent;
    *ry = kRelu ? relu_mask(r_out, out) : r_out;
  }
}

// x̂ and R{x̂} (0 without kInputTangent) of value i, from the forward's input and statistics.
// The flags are template parameters so that CPU loops carry no branch (and vectorise).
template <bool kInputTangent, typename scalar_t>
MAML_HOST_DEVICE void normalised_value(const scalar_t* x, const scalar_t* rx, int64_t i,
                                       const ForwardStats<scalar_t>& s, scalar_t& x_hat,
                                       scalar_t& rx_hat) {
  x_hat = normalise(x[i], s.mean, s.invstd);
  rx_hat = kInputTangent ? normalise_tangent(rx[i], x_hat, s) : scalar_t(0);
}

// The same with rx == nullptr for an input without tangent.
template <typename scalar_t>
MAML_HOST_DEVICE void normalised_input(const scalar_t* x, const scalar_t* rx, int64_t i,
                                       const ForwardStats<scalar_t>& s, scalar_t& x_hat,
                                       scalar_t& rx_hat) {
  if (rx != nullptr) {
    normalised_value<true>(x, rx, i, s, x_hat, rx_hat);
  } else {
    normalised_value<false>(x, rx, i, s, x_hat, rx_hat);
  }
}

// The gradient g and tangent R{g} reaching the normalisation at value i: gy, rgy masked by the
// fused ReLU (kRelu, its output y) (R{g} = 0 without kTangent).
template <bool kRelu, bool kTangent, typename scalar_t>
MAML_HOST_DEVICE void masked_gradient(const scalar_t* gy, const scalar_t* rgy, const scalar_t* y,
                                      int64_t i, scalar_t& g, scalar_t& rg) {
  g = kRelu ? relu_mask(gy[i], y[i]) : gy[i];
  rg = kTangent ? (kRelu ? relu_mask(rgy[i], y[i]) : rgy[i]) : scalar_t(0);
}

// The same with y == nullptr where there is no fused ReLU.
template <bool kTangent, typename scalar_t>
MAML_HOST_DEVICE void relu_gradient(const scalar_t* gy, const scalar_t* rgy, const scalar_t* y,
                                    int64_t i, scalar_t& g, scalar_t& rg) {
  if (y != nullptr) {
    masked_gradient<true, kTangent>(gy, rgy, y, i, g, rg);
  } else {
    masked_gradient<false, kTangent>(gy, rgy, y, i, g, rg);
  }
}

// Normalise + ReLU + 2×2 max-pool (stride 2, no padding) fused: window (oh, ow) of an H×W image
// holds the values at rows 2·oh + dy and columns 2·ow + dx, dy, dx ∈ {0, 1}, that lie inside the
// image (ceil mode's last window may hold fewer). Its position codes are 2·dy + dx, scanned in
// that order; the first maximum wins, and a NaN, as in ATen's max_pool2d, so the argmax (and the
// gradient's route) is PyTorch's.
template <typename scalar_t>
MAML_HOST_DEVICE bool pool_takes(scalar_t candidate, scalar_t best, bool first) {
  return first || candidate > best || candidate != candidate;
}

// The pooled output's size along a side of `size` values.
MAML_HOST_DEVICE int64_t pooled_size(int64_t size, bool ceil_mode) {
  return ceil_mode ? (size + 1) / 2 : size / 2;
}

// The gradient and tangent reaching value i (at row h, column w of its image) through ReLU and
// the pool: those of its window j = (n·OH + oh)·OW + ow, channel c, where this value is the
// window's argmax and the pooled (ReLU) output is positive; else 0. Values in no window (floor
// mode's last row or column) get 0.
template <bool kTangent, typename scalar_t>
MAML_HOST_DEVICE void pooled_gradient(const scalar_t* gy, const scalar_t* rgy, const scalar_t* y,
                                      const uint8_t* argmax, int64_t n, int64_t h, int64_t w,
                                      int64_t c, int64_t out_h, int64_t out_w, int64_t channels,
                                      scalar_t& g, scalar_t& rg) {
  const int64_t oh = h / 2, ow = w / 2;
  if (oh >= out_h || ow >= out_w) {
    g = rg = scalar_t(0);
    return;
  }
  const int64_t j = ((n * out_h + oh) * out_w + ow) * channels + c;
  // Selects rather than branches per value, so CPU loops over channels vectorise.
  const bool routed = argmax[j] == static_cast<uint8_t>(2 * (h % 2) + w % 2) && y[j] > scalar_t(0);
  g = routed ? gy[j] : scalar_t(0);
  rg = kTangent && routed ? rgy[j] : scalar_t(0);
}

// One value's contribution to the backward sums Σ g, Σ g x̂ and, with kTangent, Σ R{g} and
// Σ (R{g} x̂ + g R{x̂}); g, rg already masked by the fused ReLU. These are also the parameter
// gradients: gβ = Σ g, gγ = Σ g x̂, R{gβ} = Σ R{g}, R{gγ} = Σ (R{g} x̂ + g R{x̂}).
template <bool kTangent, typename acc_t, typename scalar_t>
MAML_HOST_DEVICE void backward_terms(scalar_t x_hat, scalar_t rx_hat, scalar_t g, scalar_t rg,
                                     acc_t& sum_g, acc_t& sum_g_xhat, acc_t& sum_rg,
                                     acc_t& sum_r_g_xhat) {
  sum_g += static_cast<acc_t>(g);
  sum_g_xhat += static_cast<acc_t>(g) * static_cast<acc_t>(x_hat);
  if (kTangent) {
    sum_rg += static_cast<acc_t>(rg);
    sum_r_g_xhat += static_cast<acc_t>(rg) * static_cast<acc_t>(x_hat) +
                    static_cast<acc_t>(g) * static_cast<acc_t>(rx_hat);
  }
}

// Per-channel coefficients of the input gradient:
//   D = g − mean(g) − x̂ mean(g x̂),  gx = (γ/σ) D
//   R{D} = R{g} − mean(R{g}) − R{x̂} mean(g x̂) − x̂ mean(R{g} x̂ + g R{x̂})
//   R{gx} = (v_γ/σ − γ R{σ}/σ²) D + (γ/σ) R{D}
template <typename scalar_t>
struct BackwardCoefficients {
  scalar_t mean_g, mean_g_xhat, mean_rg, mean_r_g_xhat, scale, tangent_scale;
};

template <bool kTangent, typename scalar_t, typename acc_t>
MAML_HOST_DEVICE BackwardCoefficients<scalar_t> backward_channel(
    acc_t sum_g, acc_t sum_g_xhat, acc_t sum_rg, acc_t sum_r_g_xhat, int64_t count,
    const ForwardStats<scalar_t>& s, scalar_t weight, scalar_t weight_tangent) {
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  BackwardCoefficients<scalar_t> c;
  c.mean_g = static_cast<scalar_t>(sum_g * inv_count);
  c.mean_g_xhat = static_cast<scalar_t>(sum_g_xhat * inv_count);
  c.mean_rg = kTangent ? static_cast<scalar_t>(sum_rg * inv_count) : scalar_t(0);
  c.mean_r_g_xhat = kTangent ? static_cast<scalar_t>(sum_r_g_xhat * inv_count) : scalar_t(0);
  c.scale = weight * s.invstd;
  c.tangent_scale =
      kTangent ? (weight_tangent - weight * s.r_sigma * s.invstd) * s.invstd : scalar_t(0);
  return c;
}

// gx and, with kTangent, R{gx} of one value (g, rg already masked by the fused ReLU).
template <bool kTangent, typename scalar_t>
MAML_HOST_DEVICE void backward_element(scalar_t x_hat, scalar_t rx_hat, scalar_t g, scalar_t rg,
                                       const BackwardCoefficients<scalar_t>& c, scalar_t* gx,
                                       scalar_t* rgx) {
  const scalar_t d = g - c.mean_g - x_hat * c.mean_g_xhat;
  *gx = c.scale * d;
  if (kTangent) {
    const scalar_t r_d = rg - c.mean_rg - rx_hat * c.mean_g_xhat - x_hat * c.mean_r_g_xhat;
    *rgx = c.tangent_scale * d + c.scale * r_d;
  }
}

}  // namespace kernels
}  // namespace maml_ext
