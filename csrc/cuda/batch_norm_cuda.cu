// CUDA kernels of maml_ext::task_batch_norm and task_batch_norm_backward. Per-channel sums: one
// launch over all tasks' channels (plan in kernels/batch_norm_plan.h), accumulated in the scalar
// type, the splits' partial sums added by a second small kernel in split order (deterministic).
// Element passes: one thread per value, ReLU fused into the normalise epilogue. The arithmetic
// is shared with the CPU kernels through kernels/batch_norm_math.h. Given partial statistics
// (e.g. from the convolution's epilogue), the forward merges them instead of reducing over x.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../batch_norm.h"
#include "../kernels/batch_norm_math.h"
#include "../kernels/batch_norm_partials.h"
#include "../kernels/batch_norm_plan.h"

namespace maml_ext {
namespace {

using kernels::ChannelReductionPlan;

constexpr int kThreads = static_cast<int>(kernels::kReductionThreads);
constexpr int kWarps = kThreads / static_cast<int>(kernels::kWarpSize);
constexpr int kElementThreads = 256;
constexpr int64_t kMaxElementBlocks = 1 << 20;  // the element kernels stride beyond this

// Partial sums of K per-channel quantities over one split of the rows (grid: channel group, b,
// split), written to partial[(split·K + j)·B·C + b·C + c]. terms(i, k, acc) adds value i of
// channel k = b·C + c.
template <typename scalar_t, int K, typename Terms>
__global__ void __launch_bounds__(kThreads)
    channel_partial_sums_kernel(int64_t rows, int64_t channels, ChannelReductionPlan plan,
                                Terms terms, scalar_t* __restrict__ partial) {
  const int per_block = static_cast<int>(plan.channels_per_block);
  const int lane_channel = static_cast<int>(threadIdx.x) % per_block;
  const int lane_row = static_cast<int>(threadIdx.x) / per_block;
  const int64_t b = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * per_block + lane_channel;
  const int64_t k = b * channels + c;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * plan.rows_per_split;
  const int64_t m_end = min(rows, m_begin + plan.rows_per_split);
  scalar_t acc[K];
  for (int j = 0; j < K; ++j) acc[j] = scalar_t(0);
  if (c < channels) {
    for (int64_t m = m_begin + lane_row; m < m_end; m += plan.row_lanes) {
      terms((b * rows + m) * channels + c, k, acc);
    }
  }
  // Lanes l, l + per_block, ... of a warp hold the same channel: fold them onto lane l.
  for (int offset = kernels::kWarpSize / 2; offset >= per_block; offset /= 2) {
    for (int j = 0; j < K; ++j) acc[j] += __shfl_down_sync(0xffffffffu, acc[j], offset);
  }
  __shared__ scalar_t warp_sums[kWarps][kernels::kWarpSize][K];
  const int warp = static_cast<int>(threadIdx.x) / kernels::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kernels::kWarpSize;
  if (lane < per_block) {
    for (int j = 0; j < K; ++j) warp_sums[warp][lane][j] = acc[j];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < per_block && c < channels) {
    const int64_t total = static_cast<int64_t>(gridDim.y) * channels;
    for (int j = 0; j < K; ++j) {
      scalar_t sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x][j];
      partial[(static_cast<int64_t>(blockIdx.z) * K + j) * total + k] = sum;
    }
  }
}

// Adds the splits' partial sums of each channel in split order and hands them to finish(k, sums).
template <typename scalar_t, int K, typename Finish>
__global__ void finish_channels_kernel(int64_t total, int64_t splits,
                                       const scalar_t* __restrict__ partial, Finish finish) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= total) return;
  scalar_t sums[K];
  for (int j = 0; j < K; ++j) sums[j] = scalar_t(0);
  for (int64_t s = 0; s < splits; ++s) {
    for (int j = 0; j < K; ++j) sums[j] += partial[(s * K + j) * total + k];
  }
  finish(k, sums);
}

int64_t multiprocessors(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// The two launches of one per-channel reduction of x [B, M, C].
template <typename scalar_t, int K, typename Terms, typename Finish>
void reduce_channels(const ChannelReductionPlan& plan, int64_t batch, int64_t rows,
                     int64_t channels, const Terms& terms, const Finish& finish,
                     const at::TensorOptions& options, cudaStream_t stream) {
  const int64_t total = batch * channels;
  const auto partial = at::empty({plan.splits * K * total}, options);
  const dim3 grid(static_cast<unsigned>(plan.channel_blocks), static_cast<unsigned>(batch),
                  static_cast<unsigned>(plan.splits));
  channel_partial_sums_kernel<scalar_t, K>
      <<<grid, kThreads, 0, stream>>>(rows, channels, plan, terms, partial.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  finish_channels_kernel<scalar_t, K>
      <<<blocks, kThreads, 0, stream>>>(total, plan.splits, partial.data_ptr<scalar_t>(), finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned element_blocks(int64_t n) {
  return static_cast<unsigned>(
      std::min<int64_t>((n + kElementThreads - 1) / kElementThreads, kMaxElementBlocks));
}

// Channel k = b·C + c of flat element i of x [B, M, C]. The element kernels index in 32 bits
// where the tensor allows (index_t): 64-bit division costs several times more on the GPU.
template <typename index_t>
__device__ __forceinline__ index_t channel_of(index_t i, index_t rows, index_t channels) {
  return (i / (rows * channels)) * channels + i % channels;
}

bool fits_32_bits(int64_t n) { return n <= std::numeric_limits<int32_t>::max(); }

template <typename scalar_t>
struct MeanTerms {
  const scalar_t* x;
  __device__ void operator()(int64_t i, int64_t, scalar_t* acc) const {
    kernels::mean_terms(x[i], acc[0]);
  }
};

template <typename scalar_t>
struct MeanFinish {
  scalar_t* mean;
  int64_t rows;
  __device__ void operator()(int64_t k, const scalar_t* sums) const {
    mean[k] = kernels::mean_channel<scalar_t>(sums[0], rows);
  }
};

template <typename scalar_t, bool kTangent>
struct CentredTerms {
  const scalar_t* x;
  const scalar_t* rx;
  const scalar_t* mean;
  __device__ void operator()(int64_t i, int64_t k, scalar_t* acc) const {
    if constexpr (kTangent) {
      kernels::centred_terms<true>(x[i], rx[i], mean[k], acc[0], acc[1], acc[2]);
    } else {
      scalar_t unused = 0;
      kernels::centred_terms<false>(x[i], scalar_t(0), mean[k], acc[0], unused, unused);
    }
  }
};

template <typename scalar_t, bool kTangent>
struct CentredFinish {
  const scalar_t* mean;
  scalar_t* invstd;
  scalar_t* rx_mean;  // written with kTangent
  scalar_t* r_sigma;
  int64_t rows;
  double eps;
  __device__ void operator()(int64_t k, const scalar_t* sums) const {
    scalar_t sum_rx = 0, sum_d_rx = 0;
    if constexpr (kTangent) {
      sum_rx = sums[1];
      sum_d_rx = sums[2];
    }
    const auto s =
        kernels::forward_channel<kTangent, scalar_t>(mean[k], sums[0], sum_rx, sum_d_rx, rows, eps);
    invstd[k] = s.invstd;
    if (kTangent) {
      rx_mean[k] = s.rx_mean;
      r_sigma[k] = s.r_sigma;
    }
  }
};

// The forward's statistics from partial statistics [P, B·C, 5]: one thread per channel merges
// its chunks in chunk order (kernels/batch_norm_partials.h), in place of both reduction passes.
template <typename scalar_t, bool kTangent>
__global__ void statistics_from_partials_kernel(int64_t total, int64_t chunks, int64_t rows,
                                                double eps, const scalar_t* __restrict__ partials,
                                                scalar_t* __restrict__ mean,
                                                scalar_t* __restrict__ invstd,
                                                scalar_t* __restrict__ rx_mean,
                                                scalar_t* __restrict__ r_sigma) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= total) return;
  const auto s = kernels::forward_channel_from_partials<kTangent, scalar_t, scalar_t>(
      partials, chunks, total, k, rows, eps);
  mean[k] = s.mean;
  invstd[k] = s.invstd;
  if (kTangent) {
    rx_mean[k] = s.rx_mean;
    r_sigma[k] = s.r_sigma;
  }
}

// Per-channel inputs of the forward element pass; nullptr: absent (weight 1, others 0).
template <typename scalar_t>
struct ForwardChannels {
  const scalar_t* mean;
  const scalar_t* invstd;
  const scalar_t* rx_mean;
  const scalar_t* r_sigma;
  const scalar_t* weight;
  const scalar_t* bias;
  const scalar_t* weight_tangent;
  const scalar_t* bias_tangent;
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t value_or(const scalar_t* p, int64_t k, scalar_t fallback) {
  return p != nullptr ? p[k] : fallback;
}

template <typename scalar_t>
__device__ __forceinline__ kernels::ForwardStats<scalar_t> stats_of(const scalar_t* mean,
                                                                    const scalar_t* invstd,
                                                                    const scalar_t* rx_mean,
                                                                    const scalar_t* r_sigma,
                                                                    int64_t k) {
  return {mean[k], invstd[k], value_or(rx_mean, k, scalar_t(0)), value_or(r_sigma, k, scalar_t(0))};
}

template <typename scalar_t, bool kRelu, bool kTangent, typename index_t>
__global__ void forward_element_kernel(index_t n, index_t rows, index_t channels,
                                       const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ rx, ForwardChannels<scalar_t> p,
                                       scalar_t* __restrict__ y, scalar_t* __restrict__ ry) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t k = channel_of(i, rows, channels);
    const auto s = stats_of(p.mean, p.invstd, p.rx_mean, p.r_sigma, k);
    const kernels::Affine<scalar_t> a{
        value_or(p.weight, k, scalar_t(1)), value_or(p.bias, k, scalar_t(0)),
        value_or(p.weight_tangent, k, scalar_t(0)), value_or(p.bias_tangent, k, scalar_t(0))};
    scalar_t out, r_out;
    kernels::forward_element<kRelu, kTangent>(x[i], rx != nullptr ? rx[i] : scalar_t(0), s, a, &out,
                                              &r_out);
    y[i] = out;
    if (kTangent) ry[i] = r_out;
  }
}

template <typename scalar_t, bool kRelu, bool kTangent>
void launch_forward_elements(int64_t n, int64_t rows, int64_t channels, const scalar_t* x,
                             const scalar_t* rx, const ForwardChannels<scalar_t>& p, scalar_t* y,
                             scalar_t* ry, cudaStream_t stream) {
  if (fits_32_bits(n)) {
    forward_element_kernel<scalar_t, kRelu, kTangent, uint32_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(
            static_cast<uint32_t>(n), static_cast<uint32_t>(rows), static_cast<uint32_t>(channels),
            x, rx, p, y, ry);
  } else {
    forward_element_kernel<scalar_t, kRelu, kTangent, int64_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(n, rows, channels, x, rx, p, y, ry);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x̂ and R{x̂} of the backward's values, from the forward's input and statistics; nullptr: absent.
template <typename scalar_t>
struct Normalised {
  const scalar_t* x;
  const scalar_t* rx;
  const scalar_t* mean;
  const scalar_t* invstd;
  const scalar_t* rx_mean;
  const scalar_t* r_sigma;

  __device__ kernels::ForwardStats<scalar_t> stats(int64_t k) const {
    return stats_of(mean, invstd, rx_mean, r_sigma, k);
  }
  __device__ void load(int64_t i, int64_t k, scalar_t& x_hat, scalar_t& rx_hat) const {
    kernels::normalised_input(x, rx, i, stats(k), x_hat, rx_hat);
  }
};

// The gradient reaching the normalisation: gy (and rgy), masked by the fused ReLU's output y.
template <typename scalar_t>
struct ReluGradient {
  const scalar_t* gy;
  const scalar_t* rgy;
  const scalar_t* y;  // nullptr: no fused ReLU
  template <bool kTangent>
  __device__ void get(int64_t i, scalar_t& g, scalar_t& rg) const {
    kernels::relu_gradient<kTangent>(gy, rgy, y, i, g, rg);
  }
};

// The gradient reaching the normalisation through the fused ReLU and 2×2 max-pool.
template <typename scalar_t>
struct PooledGradient {
  const scalar_t* gy;
  const scalar_t* rgy;
  const scalar_t* y;
  const uint8_t* argmax;
  int64_t h, w, out_h, out_w, channels;
  template <bool kTangent>
  __device__ void get(int64_t i, scalar_t& g, scalar_t& rg) const {
    const int64_t pixel = i / channels;
    kernels::pooled_gradient<kTangent>(gy, rgy, y, argmax, pixel / (h * w), (pixel / w) % h,
                                       pixel % w, i % channels, out_h, out_w, channels, g, rg);
  }
};

template <typename scalar_t, bool kTangent, typename Gradient>
__device__ __forceinline__ void backward_load(const Normalised<scalar_t>& n,
                                              const Gradient& gradient, int64_t i, int64_t k,
                                              scalar_t& x_hat, scalar_t& rx_hat, scalar_t& g,
                                              scalar_t& rg) {
  n.load(i, k, x_hat, rx_hat);
  gradient.template get<kTangent>(i, g, rg);
}

template <typename scalar_t, bool kTangent, typename Gradient>
struct BackwardTerms {
  Normalised<scalar_t> n;
  Gradient gradient;
  __device__ void operator()(int64_t i, int64_t k, scalar_t* acc) const {
    scalar_t x_hat, rx_hat, g, rg;
    backward_load<scalar_t, kTangent>(n, gradient, i, k, x_hat, rx_hat, g, rg);
    if constexpr (kTangent) {
      kernels::backward_terms<true>(x_hat, rx_hat, g, rg, acc[0], acc[1], acc[2], acc[3]);
    } else {
      scalar_t unused = 0;
      kernels::backward_terms<false>(x_hat, rx_hat, g, rg, acc[0], acc[1], unused, unused);
    }
  }
};

// Writes the parameter gradients and the element pass's coefficients, one array each:
// [6, B·C] in BackwardCoefficients order.
template <typename scalar_t, bool kTangent>
struct BackwardFinish {
  Normalised<scalar_t> n;
  const scalar_t* weight;
  const scalar_t* weight_tangent;
  scalar_t* grad_weight;
  scalar_t* grad_bias;
  scalar_t* grad_weight_tangent;  // written with kTangent
  scalar_t* grad_bias_tangent;
  scalar_t* coefficients;  // nullptr: no input gradient
  int64_t rows;
  int64_t total;
  __device__ void operator()(int64_t k, const scalar_t* sums) const {
    scalar_t sum_rg = 0, sum_r_g_xhat = 0;
    if constexpr (kTangent) {
      sum_rg = sums[2];
      sum_r_g_xhat = sums[3];
    }
    grad_bias[k] = sums[0];
    grad_weight[k] = sums[1];
    if (kTangent) {
      grad_bias_tangent[k] = sum_rg;
      grad_weight_tangent[k] = sum_r_g_xhat;
    }
    if (coefficients == nullptr) return;
    const auto c = kernels::backward_channel<kTangent, scalar_t>(
        sums[0], sums[1], sum_rg, sum_r_g_xhat, rows, n.stats(k), value_or(weight, k, scalar_t(1)),
        value_or(weight_tangent, k, scalar_t(0)));
    coefficients[k] = c.mean_g;
    coefficients[total + k] = c.mean_g_xhat;
    coefficients[2 * total + k] = c.mean_rg;
    coefficients[3 * total + k] = c.mean_r_g_xhat;
    coefficients[4 * total + k] = c.scale;
    coefficients[5 * total + k] = c.tangent_scale;
  }
};

template <typename scalar_t, bool kTangent, typename index_t, typename Gradient>
__global__ void backward_element_kernel(index_t n, index_t rows, index_t channels, index_t total,
                                        Normalised<scalar_t> normalised, Gradient gradient,
                                        const scalar_t* __restrict__ coefficients,
                                        scalar_t* __restrict__ gx, scalar_t* __restrict__ rgx) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t k = channel_of(i, rows, channels);
    scalar_t x_hat, rx_hat, g, rg;
    backward_load<scalar_t, kTangent>(normalised, gradient, i, k, x_hat, rx_hat, g, rg);
    const kernels::BackwardCoefficients<scalar_t> c{coefficients[k],
                                                    coefficients[total + k],
                                                    coefficients[2 * total + k],
                                                    coefficients[3 * total + k],
                                                    coefficients[4 * total + k],
                                                    coefficients[5 * total + k]};
    scalar_t out, r_out;
    kernels::backward_element<kTangent>(x_hat, rx_hat, g, rg, c, &out, &r_out);
    gx[i] = out;
    if (kTangent) rgx[i] = r_out;
  }
}

// Pooled forward: one thread per output value j of y [N, OH, OW, C], over its window's ≤ 4 inputs.
template <typename scalar_t, bool kTangent, typename index_t>
__global__ void pooled_forward_kernel(index_t n, index_t h, index_t w, index_t out_h, index_t out_w,
                                      index_t channels, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ rx, ForwardChannels<scalar_t> p,
                                      scalar_t* __restrict__ y, scalar_t* __restrict__ ry,
                                      uint8_t* __restrict__ argmax) {
  for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t c = j % channels, pixel = j / channels;
    const index_t ow = pixel % out_w, oh = (pixel / out_w) % out_h, image = pixel / (out_w * out_h);
    const auto s = stats_of(p.mean, p.invstd, p.rx_mean, p.r_sigma, c);
    const kernels::Affine<scalar_t> a{
        value_or(p.weight, c, scalar_t(1)), value_or(p.bias, c, scalar_t(0)),
        value_or(p.weight_tangent, c, scalar_t(0)), value_or(p.bias_tangent, c, scalar_t(0))};
    scalar_t best = 0, r_best = 0;
    uint8_t position = 0;
    for (index_t dy = 0; dy < 2; ++dy) {
      for (index_t dx = 0; dx < 2; ++dx) {
        const index_t hh = 2 * oh + dy, ww = 2 * ow + dx;
        if (hh >= h || ww >= w) continue;
        const index_t i = ((image * h + hh) * w + ww) * channels + c;
        scalar_t out, r_out;
        kernels::forward_element<true, kTangent>(x[i], rx != nullptr ? rx[i] : scalar_t(0), s, a,
                                                 &out, &r_out);
        if (kernels::pool_takes(out, best, dy == 0 && dx == 0)) {
          best = out;
          r_best = r_out;
          position = static_cast<uint8_t>(2 * dy + dx);
        }
      }
    }
    y[j] = best;
    if (kTangent) ry[j] = r_best;
    argmax[j] = position;
  }
}

template <typename scalar_t>
scalar_t* mutable_data_or_null(at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr;
}

// The reduction's grid has one y index per b.
void check_grid_batch(int64_t batch) {
  MAML_CHECK_ARG(batch <= kernels::kMaxGridYZ, "x", "expected at most ", kernels::kMaxGridYZ,
                 " groups of channels (x.size(0)) on CUDA, got ", batch);
}

// What both forward ops share: the inputs, per-channel parameters and statistics, and the two
// reduction passes (the mean; then invstd and, with x_tangent, mean R{x} and R{σ}).
struct ForwardSetup {
  at::Tensor x, rx, w, b, vw, vb, mean, invstd, rx_mean, r_sigma;
  bool tangent_out;

  // Statistics per channel of x [batch, ..., C].
  ForwardSetup(const at::Tensor& x_in, const OptionalTensor& x_tangent,
               const OptionalTensor& weight, const OptionalTensor& bias,
               const OptionalTensor& weight_tangent, const OptionalTensor& bias_tangent,
               int64_t batch)
      : x(x_in.contiguous()),
        rx(contiguous_or_undefined(x_tangent)),
        w(contiguous_or_undefined(weight)),
        b(contiguous_or_undefined(bias)),
        vw(contiguous_or_undefined(weight_tangent)),
        vb(contiguous_or_undefined(bias_tangent)) {
    tangent_out = rx.defined() || vw.defined() || vb.defined();
    const auto options = x.options();
    const int64_t channels = x.size(-1);
    const auto empty = at::empty({0}, options);
    mean = at::empty({batch, channels}, options);
    invstd = at::empty({batch, channels}, options);
    rx_mean = rx.defined() ? at::empty({batch, channels}, options) : empty;
    r_sigma = rx.defined() ? at::empty({batch, channels}, options) : empty;
  }

  // From the partial statistics where given (one small launch), else two reductions over x.
  template <typename scalar_t>
  void statistics(int64_t rows, double eps, const OptionalTensor& partials_in,
                  cudaStream_t stream) {
    const int64_t batch = mean.size(0), channels = mean.size(1);
    if (given(partials_in)) {
      const auto partials = partials_in->contiguous();
      const int64_t total = batch * channels;
      const auto blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
      if (rx.defined()) {
        statistics_from_partials_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
            total, partials.size(0), rows, eps, partials.data_ptr<scalar_t>(),
            mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), rx_mean.data_ptr<scalar_t>(),
            r_sigma.data_ptr<scalar_t>());
      } else {
        statistics_from_partials_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
            total, partials.size(0), rows, eps, partials.data_ptr<scalar_t>(),
            mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), nullptr, nullptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const auto plan =
        kernels::plan_channel_reduction(batch, rows, channels, multiprocessors(x.device().index()));
    const auto options = x.options();
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    scalar_t* mean_p = mean.data_ptr<scalar_t>();
    scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    reduce_channels<scalar_t, 1>(plan, batch, rows, channels, MeanTerms<scalar_t>{x_p},
                                 MeanFinish<scalar_t>{mean_p, rows}, options, stream);
    if (rx.defined()) {
      reduce_channels<scalar_t, 3>(
          plan, batch, rows, channels,
          CentredTerms<scalar_t, true>{x_p, rx.data_ptr<scalar_t>(), mean_p},
          CentredFinish<scalar_t, true>{mean_p, invstd_p, rx_mean.data_ptr<scalar_t>(),
                                        r_sigma.data_ptr<scalar_t>(), rows, eps},
          options, stream);
    } else {
      reduce_channels<scalar_t, 1>(
          plan, batch, rows, channels, CentredTerms<scalar_t, false>{x_p, nullptr, mean_p},
          CentredFinish<scalar_t, false>{mean_p, invstd_p, nullptr, nullptr, rows, eps}, options,
          stream);
    }
  }

  template <typename scalar_t>
  ForwardChannels<scalar_t> channels() {
    return {mean.data_ptr<scalar_t>(),
            invstd.data_ptr<scalar_t>(),
            mutable_data_or_null<scalar_t>(rx_mean),
            mutable_data_or_null<scalar_t>(r_sigma),
            data_or_null<scalar_t>(w),
            data_or_null<scalar_t>(b),
            data_or_null<scalar_t>(vw),
            data_or_null<scalar_t>(vb)};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_cuda(const at::Tensor& x_in, const OptionalTensor& x_tangent,
                     const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& weight_tangent, const OptionalTensor& bias_tangent,
                     double eps, bool relu, const OptionalTensor& partial_statistics) {
  check_task_batch_norm_args(x_in, x_tangent, weight, bias, weight_tangent, bias_tangent, eps);
  check_partial_statistics(partial_statistics, x_in, x_in.size(0));
  check_grid_batch(x_in.size(0));
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  ForwardSetup f(x_in, x_tangent, weight, bias, weight_tangent, bias_tangent, x_in.size(0));
  const int64_t rows = f.x.size(1), channels = f.x.size(2);
  auto y = at::empty_like(f.x);
  auto ry = f.tangent_out ? at::empty_like(f.x) : at::empty({0}, f.x.options());
  if (f.x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "task_batch_norm_cuda", [&] {
      f.statistics<scalar_t>(rows, eps, partial_statistics, stream);
      const auto p = f.channels<scalar_t>();
      const scalar_t* x_p = f.x.data_ptr<scalar_t>();
      const scalar_t* rx_p = data_or_null<scalar_t>(f.rx);
      scalar_t* y_p = y.data_ptr<scalar_t>();
      scalar_t* ry_p = mutable_data_or_null<scalar_t>(ry);
      const int64_t n = f.x.numel();
      if (relu && f.tangent_out) {
        launch_forward_elements<scalar_t, true, true>(n, rows, channels, x_p, rx_p, p, y_p, ry_p,
                                                      stream);
      } else if (relu) {
        launch_forward_elements<scalar_t, true, false>(n, rows, channels, x_p, rx_p, p, y_p, ry_p,
                                                       stream);
      } else if (f.tangent_out) {
        launch_forward_elements<scalar_t, false, true>(n, rows, channels, x_p, rx_p, p, y_p, ry_p,
                                                       stream);
      } else {
        launch_forward_elements<scalar_t, false, false>(n, rows, channels, x_p, rx_p, p, y_p, ry_p,
                                                        stream);
      }
    });
  }
  return {y, ry, f.mean, f.invstd, f.rx_mean, f.r_sigma};
}

template <typename scalar_t, bool kTangent>
void launch_pooled_forward(int64_t n, int64_t h, int64_t w, int64_t out_h, int64_t out_w,
                           int64_t channels, const scalar_t* x, const scalar_t* rx,
                           const ForwardChannels<scalar_t>& p, scalar_t* y, scalar_t* ry,
                           uint8_t* argmax, cudaStream_t stream) {
  // Input indices reach h·w·channels per image: 32 bits only where all of x fits.
  const int64_t inputs = (n / (out_h * out_w)) * h * w;
  if (fits_32_bits(std::max(n, inputs))) {
    pooled_forward_kernel<scalar_t, kTangent, uint32_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(
            static_cast<uint32_t>(n), static_cast<uint32_t>(h), static_cast<uint32_t>(w),
            static_cast<uint32_t>(out_h), static_cast<uint32_t>(out_w),
            static_cast<uint32_t>(channels), x, rx, p, y, ry, argmax);
  } else {
    pooled_forward_kernel<scalar_t, kTangent, int64_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(n, h, w, out_h, out_w, channels, x, rx,
                                                            p, y, ry, argmax);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_cuda(const at::Tensor& x_in, const OptionalTensor& x_tangent,
                                   const OptionalTensor& weight, const OptionalTensor& bias,
                                   const OptionalTensor& weight_tangent,
                                   const OptionalTensor& bias_tangent, double eps, bool ceil_mode,
                                   const OptionalTensor& partial_statistics) {
  check_task_batch_norm_relu_max_pool_args(x_in, x_tangent, weight, bias, weight_tangent,
                                           bias_tangent, eps, ceil_mode);
  check_partial_statistics(partial_statistics, x_in, 1);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  ForwardSetup f(x_in, x_tangent, weight, bias, weight_tangent, bias_tangent, 1);
  const int64_t h = f.x.size(1), w = f.x.size(2), channels = f.x.size(3);
  const int64_t out_h = kernels::pooled_size(h, ceil_mode);
  const int64_t out_w = kernels::pooled_size(w, ceil_mode);
  const auto options = f.x.options();
  auto y = at::empty({f.x.size(0), out_h, out_w, channels}, options);
  auto ry = f.tangent_out ? at::empty_like(y) : at::empty({0}, options);
  auto argmax = at::empty(y.sizes(), options.dtype(at::kByte));
  if (f.x.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "task_batch_norm_relu_max_pool_cuda", [&] {
      f.statistics<scalar_t>(f.x.numel() / channels, eps, partial_statistics, stream);
      const auto p = f.channels<scalar_t>();
      const scalar_t* x_p = f.x.data_ptr<scalar_t>();
      const scalar_t* rx_p = data_or_null<scalar_t>(f.rx);
      scalar_t* ry_p = mutable_data_or_null<scalar_t>(ry);
      if (f.tangent_out) {
        launch_pooled_forward<scalar_t, true>(y.numel(), h, w, out_h, out_w, channels, x_p, rx_p, p,
                                              y.data_ptr<scalar_t>(), ry_p,
                                              argmax.data_ptr<uint8_t>(), stream);
      } else {
        launch_pooled_forward<scalar_t, false>(y.numel(), h, w, out_h, out_w, channels, x_p, rx_p,
                                               p, y.data_ptr<scalar_t>(), ry_p,
                                               argmax.data_ptr<uint8_t>(), stream);
      }
    });
  }
  return {y, ry, argmax, f.mean, f.invstd, f.rx_mean, f.r_sigma};
}

// The backward's reduction and element launches over x [B, M, C], shared by both backward ops.
template <typename scalar_t, bool kTangent, typename Gradient>
void launch_backward(
    int64_t batch, int64_t rows, int64_t channels, const Normalised<scalar_t>& normalised,
    const Gradient& gradient, const scalar_t* weight, const scalar_t* weight_tangent,
    bool input_grad,
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>& out,
    const at::TensorOptions& options, c10::DeviceIndex device, cudaStream_t stream) {
  auto& [gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent] = out;
  const int64_t total = batch * channels;
  const auto plan = kernels::plan_channel_reduction(batch, rows, channels, multiprocessors(device));
  auto coefficients = input_grad ? at::empty({6 * total}, options) : at::Tensor();
  const BackwardFinish<scalar_t, kTangent> finish{
      normalised,
      weight,
      weight_tangent,
      grad_weight.data_ptr<scalar_t>(),
      grad_bias.data_ptr<scalar_t>(),
      mutable_data_or_null<scalar_t>(grad_weight_tangent),
      mutable_data_or_null<scalar_t>(grad_bias_tangent),
      input_grad ? coefficients.data_ptr<scalar_t>() : nullptr,
      rows,
      total};
  reduce_channels<scalar_t, kTangent ? 4 : 2>(
      plan, batch, rows, channels,
      BackwardTerms<scalar_t, kTangent, Gradient>{normalised, gradient}, finish, options, stream);
  if (!input_grad) return;
  const int64_t n = batch * rows * channels;
  const scalar_t* c_p = coefficients.data_ptr<scalar_t>();
  scalar_t* gx_p = gx.data_ptr<scalar_t>();
  scalar_t* rgx_p = mutable_data_or_null<scalar_t>(rgx);
  if (fits_32_bits(n)) {
    backward_element_kernel<scalar_t, kTangent, uint32_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(
            static_cast<uint32_t>(n), static_cast<uint32_t>(rows), static_cast<uint32_t>(channels),
            static_cast<uint32_t>(total), normalised, gradient, c_p, gx_p, rgx_p);
  } else {
    backward_element_kernel<scalar_t, kTangent, int64_t>
        <<<element_blocks(n), kElementThreads, 0, stream>>>(n, rows, channels, total, normalised,
                                                            gradient, c_p, gx_p, rgx_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_backward_cuda(const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent,
                              const at::Tensor& x_in, const OptionalTensor& x_tangent,
                              const OptionalTensor& weight, const OptionalTensor& weight_tangent,
                              const at::Tensor& mean_in, const at::Tensor& invstd_in,
                              const OptionalTensor& x_tangent_mean,
                              const OptionalTensor& sigma_tangent,
                              const OptionalTensor& relu_output, bool input_grad) {
  check_task_batch_norm_backward_args(grad_y, grad_y_tangent, x_in, x_tangent, weight,
                                      weight_tangent, mean_in, invstd_in, x_tangent_mean,
                                      sigma_tangent, relu_output);
  check_grid_batch(x_in.size(0));
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const bool tangent = given(grad_y_tangent);
  const auto x = x_in.contiguous();
  const auto gy = grad_y.contiguous();
  const auto rgy = contiguous_or_undefined(grad_y_tangent);
  // The input's tangent enters only the tangent outputs.
  const auto rx = tangent ? contiguous_or_undefined(x_tangent) : at::Tensor();
  const auto rx_mean = rx.defined() ? contiguous_or_undefined(x_tangent_mean) : at::Tensor();
  const auto r_sigma = rx.defined() ? contiguous_or_undefined(sigma_tangent) : at::Tensor();
  const auto y = contiguous_or_undefined(relu_output);
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const auto w = contiguous_or_undefined(weight);
  const auto vw = tangent ? contiguous_or_undefined(weight_tangent) : at::Tensor();
  const int64_t batch = x.size(0), rows = x.size(1), channels = x.size(2);
  auto out = backward_outputs(x, batch, channels, tangent, input_grad);
  if (x.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_batch_norm_backward_cuda", [&] {
    const Normalised<scalar_t> normalised{
        x.data_ptr<scalar_t>(),          data_or_null<scalar_t>(rx),
        mean.data_ptr<scalar_t>(),       invstd.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(rx_mean), data_or_null<scalar_t>(r_sigma)};
    const ReluGradient<scalar_t> gradient{gy.data_ptr<scalar_t>(), data_or_null<scalar_t>(rgy),
                                          data_or_null<scalar_t>(y)};
    if (tangent) {
      launch_backward<scalar_t, true>(batch, rows, channels, normalised, gradient,
                                      data_or_null<scalar_t>(w), data_or_null<scalar_t>(vw),
                                      input_grad, out, x.options(), x.device().index(), stream);
    } else {
      launch_backward<scalar_t, false>(batch, rows, channels, normalised, gradient,
                                       data_or_null<scalar_t>(w), nullptr, input_grad, out,
                                       x.options(), x.device().index(), stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_backward_cuda(
    const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent, const at::Tensor& x_in,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
    const at::Tensor& output, const at::Tensor& argmax_in, bool input_grad) {
  check_task_batch_norm_relu_max_pool_backward_args(
      grad_y, grad_y_tangent, x_in, x_tangent, weight, weight_tangent, mean_in, invstd_in,
      x_tangent_mean, sigma_tangent, output, argmax_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const bool tangent = given(grad_y_tangent);
  const auto x = x_in.contiguous();
  const auto gy = grad_y.contiguous();
  const auto rgy = contiguous_or_undefined(grad_y_tangent);
  const auto rx = tangent ? contiguous_or_undefined(x_tangent) : at::Tensor();
  const auto rx_mean = rx.defined() ? contiguous_or_undefined(x_tangent_mean) : at::Tensor();
  const auto r_sigma = rx.defined() ? contiguous_or_undefined(sigma_tangent) : at::Tensor();
  const auto y = output.contiguous();
  const auto argmax = argmax_in.contiguous();
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const auto w = contiguous_or_undefined(weight);
  const auto vw = tangent ? contiguous_or_undefined(weight_tangent) : at::Tensor();
  const int64_t h = x.size(1), width = x.size(2), channels = x.size(3);
  auto out = backward_outputs(x, 1, channels, tangent, input_grad);
  if (x.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_batch_norm_relu_max_pool_backward_cuda", [&] {
    const Normalised<scalar_t> normalised{
        x.data_ptr<scalar_t>(),          data_or_null<scalar_t>(rx),
        mean.data_ptr<scalar_t>(),       invstd.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(rx_mean), data_or_null<scalar_t>(r_sigma)};
    const PooledGradient<scalar_t> gradient{gy.data_ptr<scalar_t>(),
                                            data_or_null<scalar_t>(rgy),
                                            y.data_ptr<scalar_t>(),
                                            argmax.data_ptr<uint8_t>(),
                                            h,
                                            width,
                                            y.size(1),
                                            y.size(2),
                                            channels};
    const int64_t rows = x.numel() / channels;
    if (tangent) {
      launch_backward<scalar_t, true>(1, rows, channels, normalised, gradient,
                                      data_or_null<scalar_t>(w), data_or_null<scalar_t>(vw),
                                      input_grad, out, x.options(), x.device().index(), stream);
    } else {
      launch_backward<scalar_t, false>(1, rows, channels, normalised, gradient,
                                       data_or_null<scalar_t>(w), nullptr, input_grad, out,
                                       x.options(), x.device().index(), stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maml_ext, CUDA, m) {
  m.impl("task_batch_norm", &task_batch_norm_cuda);
  m.impl("task_batch_norm_backward", &task_batch_norm_backward_cuda);
  m.impl("task_batch_norm_relu_max_pool", &task_batch_norm_relu_max_pool_cuda);
  m.impl("task_batch_norm_relu_max_pool_backward", &task_batch_norm_relu_max_pool_backward_cuda);
}

}  // namespace maml_ext
