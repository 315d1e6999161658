// The CPU kernels of maml_ext::task_batch_norm, task_batch_norm_backward and their ReLU +
// 2 × 2 max-pool variants (batch_norm_cpu.cpp registers them): channel sums and element passes in
// parallel over rows (the sums in fixed units added in order, so results do not depend on the
// thread count), vectorised over the channels; arithmetic shared with the CUDA kernels through
// kernels/batch_norm_math.h. Given partial statistics (kernels/batch_norm_partials.h), the forward
// merges them instead of summing over x.
//
// Compiled once per instruction set (for_each_isa.h): no include guard, no includes (see
// batch_norm_cpu.cpp for what it uses).

// Calls f(std::true_type) or f(std::false_type): a runtime flag becomes a template flag, so the
// inner loops carry no branch on it.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Runs loop() with everything it calls inlined into it (flatten): the element lambdas and the
// arithmetic of kernels/batch_norm_math.h, so the loop holds no call and vectorises, for this
// copy's instruction set.
// no-tree-sink: GCC otherwise moves the tangent's arithmetic into the ReLU's "output > 0" branch
// (only that branch uses it), and a loop with a branch is not vectorised.
#if defined(__GNUC__) && !defined(__clang__)
#define MAML_VECTOR_LOOP_OPTIONS optimize("no-tree-sink")
#else
#define MAML_VECTOR_LOOP_OPTIONS
#endif
template <typename F>
__attribute__((noinline, flatten, MAML_VECTOR_LOOP_OPTIONS)) void run_vectorised(const F& loop) {
  loop();
}
#undef MAML_VECTOR_LOOP_OPTIONS

// Rows summed in the scalar type before they are added into acc_t: float sums run twice as many
// lanes per vector instruction as double ones, and a block of 64 loses little precision.
constexpr int64_t kBlockRows = 64;
// Rows of one unit of the channel sums. Units run in parallel, each summing all channels of its
// rows (whole contiguous rows: long vector loops), and their sums are added in unit order, so the
// result does not depend on the thread count.
constexpr int64_t kUnitRows = 1024;

// Four per-channel sums of x [B, M, C]: terms(row, i, k, s0, s1, s2, s3) adds element i (flat
// index; row = b·M + m, so i = row·C + c) of channel k (b·C + c) into that channel's sums (of any
// type: generic lambdas). Returns sums[j·B·C + k] in acc_t.
template <typename scalar_t, typename acc_t, typename Terms>
std::vector<acc_t> channel_sums(int64_t batch, int64_t rows, int64_t channels, const Terms& terms) {
  const int64_t total = batch * channels;
  const int64_t units_per_b = (rows + kUnitRows - 1) / kUnitRows;
  const int64_t units = batch * units_per_b;
  std::vector<acc_t> unit_sums(static_cast<size_t>(units * 4 * channels), acc_t(0));
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / (std::min(rows, kUnitRows) * channels));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> block(4 * channels);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / units_per_b, m_begin = (u % units_per_b) * kUnitRows;
      const int64_t m_end = std::min(rows, m_begin + kUnitRows);
      acc_t* __restrict__ acc = unit_sums.data() + u * 4 * channels;
      scalar_t* __restrict__ b0 = block.data();
      scalar_t* __restrict__ b1 = b0 + channels;
      scalar_t* __restrict__ b2 = b1 + channels;
      scalar_t* __restrict__ b3 = b2 + channels;
      run_vectorised([&] {
        for (int64_t m0 = m_begin; m0 < m_end; m0 += kBlockRows) {
          for (int64_t j = 0; j < 4 * channels; ++j) b0[j] = scalar_t(0);
          for (int64_t m = m0; m < std::min(m_end, m0 + kBlockRows); ++m) {
            const int64_t row = b * rows + m, base = row * channels, k0 = b * channels;
#pragma GCC ivdep
            for (int64_t c = 0; c < channels; ++c) {
              terms(row, base + c, k0 + c, b0[c], b1[c], b2[c], b3[c]);
            }
          }
          for (int64_t j = 0; j < 4 * channels; ++j) acc[j] += static_cast<acc_t>(b0[j]);
        }
      });
    }
  });
  std::vector<acc_t> sums(4 * total, acc_t(0));
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / units_per_b;
    for (int s = 0; s < 4; ++s) {
      const acc_t* part = unit_sums.data() + (u * 4 + s) * channels;
      acc_t* out = sums.data() + s * total + b * channels;
      for (int64_t c = 0; c < channels; ++c) out[c] += part[c];
    }
  }
  return sums;
}

// Runs body(row, i, k) over every element i of x [B, M, C] with its row b·M + m and channel k,
// in parallel over rows.
template <typename Body>
void for_each_element(int64_t batch, int64_t rows, int64_t channels, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / channels);
  at::parallel_for(0, batch * rows, grain, [&](int64_t begin, int64_t end) {
    run_vectorised([&] {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * channels, kb = (row / rows) * channels;
#pragma GCC ivdep
        for (int64_t c = 0; c < channels; ++c) {
          body(row, base + c, kb + c);
        }
      }
    });
  });
}

// The data of an optional per-channel tensor, or of a constant fill where it is absent.
template <typename scalar_t>
class ChannelValues {
 public:
  ChannelValues(const OptionalTensor& t, int64_t count, scalar_t fill) {
    if (given(t)) {
      tensor_ = t->contiguous();
      data_ = tensor_.data_ptr<scalar_t>();
    } else {
      fill_.assign(count, fill);
      data_ = fill_.data();
    }
  }
  const scalar_t* data() const { return data_; }

 private:
  at::Tensor tensor_;
  std::vector<scalar_t> fill_;
  const scalar_t* data_;
};

// The forward's reduction passes over x [B, M, C]: the mean, then invstd and, with rx, mean R{x}
// and R{σ} (left untouched without rx).
template <typename scalar_t>
void forward_statistics(int64_t batch, int64_t rows, int64_t channels, const scalar_t* x_p,
                        const scalar_t* rx_p, double eps, scalar_t* mean_p, scalar_t* invstd_p,
                        scalar_t* rx_mean_p, scalar_t* r_sigma_p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t total = batch * channels;
  const auto sum_x = channel_sums<scalar_t, acc_t>(
      batch, rows, channels, [&](int64_t, int64_t i, int64_t, auto& s, auto&, auto&, auto&) {
        kernels::mean_terms(x_p[i], s);
      });
  for (int64_t k = 0; k < total; ++k) {
    mean_p[k] = kernels::mean_channel<scalar_t>(sum_x[k], rows);
  }
  with_flag(rx_p != nullptr, [&](auto has_tangent) {
    constexpr bool kTangent = decltype(has_tangent)::value;
    const auto sums = channel_sums<scalar_t, acc_t>(
        batch, rows, channels,
        [&](int64_t, int64_t i, int64_t k, auto& s0, auto& s1, auto& s2, auto&) {
          kernels::centred_terms<kTangent>(x_p[i], kTangent ? rx_p[i] : scalar_t(0), mean_p[k], s0,
                                           s1, s2);
        });
    for (int64_t k = 0; k < total; ++k) {
      const auto s = kernels::forward_channel<kTangent, scalar_t>(
          mean_p[k], sums[k], sums[total + k], sums[2 * total + k], rows, eps);
      invstd_p[k] = s.invstd;
      if (kTangent) {
        rx_mean_p[k] = s.rx_mean;
        r_sigma_p[k] = s.r_sigma;
      }
    }
  });
}

// The forward's statistics from partial statistics [P, B, C, 5] (batch_norm.h), merged per
// channel in chunk order: no pass over x.
// A stand-in of the CUDA path (only CUDA convolutions produce partials): it exists so that CPU
// tests cover that path's merge arithmetic and the op's contract on CPU tensors.
template <typename scalar_t>
void statistics_from_partials(int64_t total, int64_t rows, const at::Tensor& partials, bool tangent,
                              double eps, scalar_t* mean_p, scalar_t* invstd_p, scalar_t* rx_mean_p,
                              scalar_t* r_sigma_p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto p = partials.contiguous();
  const scalar_t* p_p = p.data_ptr<scalar_t>();
  const int64_t chunks = p.size(0);
  with_flag(tangent, [&](auto has_tangent) {
    constexpr bool kTangent = decltype(has_tangent)::value;
    for (int64_t k = 0; k < total; ++k) {
      const auto s = kernels::forward_channel_from_partials<kTangent, scalar_t, acc_t>(
          p_p, chunks, total, k, rows, eps);
      mean_p[k] = s.mean;
      invstd_p[k] = s.invstd;
      if (kTangent) {
        rx_mean_p[k] = s.rx_mean;
        r_sigma_p[k] = s.r_sigma;
      }
    }
  });
}

// What both forward ops share: the inputs, the statistics, the per-channel parameters.
struct ForwardSetup {
  at::Tensor x, rx, mean, invstd, rx_mean, r_sigma;
  bool tangent_out;

  // Statistics per channel of x [batch, ..., C].
  ForwardSetup(const at::Tensor& x_in, const OptionalTensor& x_tangent,
               const OptionalTensor& weight_tangent, const OptionalTensor& bias_tangent,
               int64_t batch)
      : x(x_in.contiguous()), rx(contiguous_or_undefined(x_tangent)) {
    tangent_out = rx.defined() || given(weight_tangent) || given(bias_tangent);
    const auto options = x.options();
    const int64_t channels = x.size(-1);
    mean = at::empty({batch, channels}, options);
    invstd = at::empty({batch, channels}, options);
    rx_mean = at::zeros({batch, channels}, options);
    r_sigma = at::zeros({batch, channels}, options);
  }

  // rows: values per channel. From the partial statistics where given, else two passes over x.
  template <typename scalar_t>
  void statistics(int64_t rows, double eps, const OptionalTensor& partials) {
    if (given(partials)) {
      statistics_from_partials<scalar_t>(
          mean.numel(), rows, *partials, rx.defined(), eps, mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(), rx_mean.data_ptr<scalar_t>(), r_sigma.data_ptr<scalar_t>());
      return;
    }
    forward_statistics<scalar_t>(mean.size(0), rows, x.size(-1), x.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(rx), eps, mean.data_ptr<scalar_t>(),
                                 invstd.data_ptr<scalar_t>(), rx_mean.data_ptr<scalar_t>(),
                                 r_sigma.data_ptr<scalar_t>());
  }

  at::Tensor saved_rx_mean() const { return rx.defined() ? rx_mean : at::empty({0}, x.options()); }
  at::Tensor saved_r_sigma() const { return rx.defined() ? r_sigma : at::empty({0}, x.options()); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_cpu(const at::Tensor& x_in, const OptionalTensor& x_tangent,
                    const OptionalTensor& weight, const OptionalTensor& bias,
                    const OptionalTensor& weight_tangent, const OptionalTensor& bias_tangent,
                    double eps, bool relu, const OptionalTensor& partial_statistics) {
  check_task_batch_norm_args(x_in, x_tangent, weight, bias, weight_tangent, bias_tangent, eps);
  check_partial_statistics(partial_statistics, x_in, x_in.size(0));
  ForwardSetup f(x_in, x_tangent, weight_tangent, bias_tangent, x_in.size(0));
  const int64_t batch = f.x.size(0), rows = f.x.size(1), channels = f.x.size(2);
  const int64_t total = batch * channels;
  auto y = at::empty_like(f.x);
  auto ry = f.tangent_out ? at::empty_like(f.x) : at::empty({0}, f.x.options());
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "task_batch_norm_cpu", [&] {
    f.statistics<scalar_t>(rows, eps, partial_statistics);
    const scalar_t* x_p = f.x.data_ptr<scalar_t>();
    const scalar_t* rx_p = data_or_null<scalar_t>(f.rx);
    const scalar_t *mean_p = f.mean.data_ptr<scalar_t>(), *invstd_p = f.invstd.data_ptr<scalar_t>();
    const scalar_t* rx_mean_p = f.rx_mean.data_ptr<scalar_t>();
    const scalar_t* r_sigma_p = f.r_sigma.data_ptr<scalar_t>();
    const ChannelValues<scalar_t> w(weight, total, 1), b(bias, total, 0);
    const ChannelValues<scalar_t> vw(weight_tangent, total, 0), vb(bias_tangent, total, 0);
    const scalar_t *w_p = w.data(), *b_p = b.data(), *vw_p = vw.data(), *vb_p = vb.data();
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* ry_p = f.tangent_out ? ry.data_ptr<scalar_t>() : nullptr;
    with_flag(relu, [&](auto relu_flag) {
      with_flag(f.tangent_out, [&](auto tangent_flag) {
        with_flag(rx_p != nullptr, [&](auto input_tangent_flag) {
          constexpr bool kRelu = decltype(relu_flag)::value;
          constexpr bool kTangent = decltype(tangent_flag)::value;
          constexpr bool kInputTangent = decltype(input_tangent_flag)::value;
          for_each_element(batch, rows, channels, [&](int64_t, int64_t i, int64_t k) {
            const kernels::ForwardStats<scalar_t> s{mean_p[k], invstd_p[k], rx_mean_p[k],
                                                    r_sigma_p[k]};
            const kernels::Affine<scalar_t> a{w_p[k], b_p[k], vw_p[k], vb_p[k]};
            scalar_t out, r_out;
            kernels::forward_element<kRelu, kTangent>(x_p[i], kInputTangent ? rx_p[i] : scalar_t(0),
                                                      s, a, &out, &r_out);
            y_p[i] = out;
            if (kTangent) ry_p[i] = r_out;
          });
        });
      });
    });
  });
  return {y, ry, f.mean, f.invstd, f.saved_rx_mean(), f.saved_r_sigma()};
}

// A stand-in of the CUDA path (the layers fuse the pool on CUDA only): it exists so that CPU tests
// cover that path's arithmetic and the op's contract on CPU tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_cpu(const at::Tensor& x_in, const OptionalTensor& x_tangent,
                                  const OptionalTensor& weight, const OptionalTensor& bias,
                                  const OptionalTensor& weight_tangent,
                                  const OptionalTensor& bias_tangent, double eps, bool ceil_mode,
                                  const OptionalTensor& partial_statistics) {
  check_task_batch_norm_relu_max_pool_args(x_in, x_tangent, weight, bias, weight_tangent,
                                           bias_tangent, eps, ceil_mode);
  check_partial_statistics(partial_statistics, x_in, 1);
  ForwardSetup f(x_in, x_tangent, weight_tangent, bias_tangent, 1);
  const int64_t n = f.x.size(0), h = f.x.size(1), w = f.x.size(2), channels = f.x.size(3);
  const int64_t out_h = kernels::pooled_size(h, ceil_mode);
  const int64_t out_w = kernels::pooled_size(w, ceil_mode);
  const auto options = f.x.options();
  auto y = at::empty({n, out_h, out_w, channels}, options);
  auto ry = f.tangent_out ? at::empty_like(y) : at::empty({0}, options);
  auto argmax = at::empty({n, out_h, out_w, channels}, options.dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(f.x.scalar_type(), "task_batch_norm_relu_max_pool_cpu", [&] {
    f.statistics<scalar_t>(n * h * w, eps, partial_statistics);
    const scalar_t* x_p = f.x.data_ptr<scalar_t>();
    const scalar_t* rx_p = data_or_null<scalar_t>(f.rx);
    const ChannelValues<scalar_t> wt(weight, channels, 1), b(bias, channels, 0);
    const ChannelValues<scalar_t> vw(weight_tangent, channels, 0), vb(bias_tangent, channels, 0);
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* ry_p = f.tangent_out ? ry.data_ptr<scalar_t>() : nullptr;
    uint8_t* argmax_p = argmax.data_ptr<uint8_t>();
    const scalar_t *mean_p = f.mean.data_ptr<scalar_t>(), *invstd_p = f.invstd.data_ptr<scalar_t>();
    const scalar_t* rx_mean_p = f.rx_mean.data_ptr<scalar_t>();
    const scalar_t* r_sigma_p = f.r_sigma.data_ptr<scalar_t>();
    const scalar_t *w_p = wt.data(), *b_p = b.data(), *vw_p = vw.data(), *vb_p = vb.data();
    with_flag(f.tangent_out, [&](auto tangent_flag) {
      constexpr bool kTangent = decltype(tangent_flag)::value;
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * out_w * channels));
      at::parallel_for(0, n * out_h, grain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t image = row / out_h, oh = row % out_h;
          for (int64_t ow = 0; ow < out_w; ++ow) {
            // The window's candidates one position at a time, each over all channels (a loop
            // the compiler vectorises), keeping the best so far in the outputs.
            const int64_t j0 = (row * out_w + ow) * channels;
            for (int64_t position = 0; position < 4; ++position) {
              const int64_t hh = 2 * oh + position / 2, ww = 2 * ow + position % 2;
              if (hh >= h || ww >= w) continue;
              const int64_t i0 = ((image * h + hh) * w + ww) * channels;
              for (int64_t c = 0; c < channels; ++c) {
                const kernels::ForwardStats<scalar_t> s{mean_p[c], invstd_p[c], rx_mean_p[c],
                                                        r_sigma_p[c]};
                const kernels::Affine<scalar_t> a{w_p[c], b_p[c], vw_p[c], vb_p[c]};
                scalar_t out, r_out;
                kernels::forward_element<true, kTangent>(
                    x_p[i0 + c], rx_p ? rx_p[i0 + c] : scalar_t(0), s, a, &out, &r_out);
                const bool take = kernels::pool_takes(out, y_p[j0 + c], position == 0);
                y_p[j0 + c] = take ? out : y_p[j0 + c];
                if (kTangent) ry_p[j0 + c] = take ? r_out : ry_p[j0 + c];
                argmax_p[j0 + c] = take ? static_cast<uint8_t>(position) : argmax_p[j0 + c];
              }
            }
          }
        }
      });
    });
  });
  return {y, ry, argmax, f.mean, f.invstd, f.saved_rx_mean(), f.saved_r_sigma()};
}

// The backward's two passes over x [B, M, C], shared by both backward ops: gradient(row, i, g, rg)
// gives the gradient and tangent reaching the normalisation at value i of row b·M + m.
template <typename scalar_t, bool kTangent, bool kInputTangent, typename Gradient>
void backward_passes(int64_t batch, int64_t rows, int64_t channels, const at::Tensor& x,
                     const at::Tensor& rx, const at::Tensor& mean, const at::Tensor& invstd,
                     const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
                     const OptionalTensor& weight, const OptionalTensor& weight_tangent,
                     const Gradient& gradient, bool input_grad, at::Tensor& gx, at::Tensor& rgx,
                     at::Tensor& grad_weight, at::Tensor& grad_bias,
                     at::Tensor& grad_weight_tangent, at::Tensor& grad_bias_tangent) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t total = batch * channels;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const scalar_t* rx_p = data_or_null<scalar_t>(rx);
  const ChannelValues<scalar_t> mean_v(mean, total, 0), invstd_v(invstd, total, 0);
  const ChannelValues<scalar_t> rx_mean_v(rx.defined() ? x_tangent_mean : std::nullopt, total, 0);
  const ChannelValues<scalar_t> r_sigma_v(rx.defined() ? sigma_tangent : std::nullopt, total, 0);
  const ChannelValues<scalar_t> w(weight, total, 1), vw(weight_tangent, total, 0);
  const scalar_t *mean_p = mean_v.data(), *invstd_p = invstd_v.data();
  const scalar_t *rx_mean_p = rx_mean_v.data(), *r_sigma_p = r_sigma_v.data();
  const scalar_t *w_p = w.data(), *vw_p = vw.data();
  const auto element = [&](int64_t row, int64_t i, int64_t k, scalar_t& x_hat, scalar_t& rx_hat,
                           scalar_t& g, scalar_t& rg) {
    const kernels::ForwardStats<scalar_t> s{mean_p[k], invstd_p[k], rx_mean_p[k], r_sigma_p[k]};
    kernels::normalised_value<kInputTangent>(x_p, rx_p, i, s, x_hat, rx_hat);
    gradient(row, i, g, rg);
  };
  const auto sums = channel_sums<scalar_t, acc_t>(
      batch, rows, channels,
      [&](int64_t row, int64_t i, int64_t k, auto& s0, auto& s1, auto& s2, auto& s3) {
        scalar_t x_hat, rx_hat, g, rg;
        element(row, i, k, x_hat, rx_hat, g, rg);
        kernels::backward_terms<kTangent>(x_hat, rx_hat, g, rg, s0, s1, s2, s3);
      });
  scalar_t* gb_p = grad_bias.data_ptr<scalar_t>();
  scalar_t* gw_p = grad_weight.data_ptr<scalar_t>();
  for (int64_t k = 0; k < total; ++k) {
    gb_p[k] = static_cast<scalar_t>(sums[k]);
    gw_p[k] = static_cast<scalar_t>(sums[total + k]);
  }
  if (kTangent) {
    scalar_t* rgb_p = grad_bias_tangent.data_ptr<scalar_t>();
    scalar_t* rgw_p = grad_weight_tangent.data_ptr<scalar_t>();
    for (int64_t k = 0; k < total; ++k) {
      rgb_p[k] = static_cast<scalar_t>(sums[2 * total + k]);
      rgw_p[k] = static_cast<scalar_t>(sums[3 * total + k]);
    }
  }
  if (!input_grad) return;
  // Coefficients as separate arrays, so the element loop reads each contiguously.
  std::vector<scalar_t> coefficients(6 * total);
  scalar_t* mean_g = coefficients.data();
  scalar_t* mean_g_xhat = mean_g + total;
  scalar_t* mean_rg = mean_g_xhat + total;
  scalar_t* mean_r_g_xhat = mean_rg + total;
  scalar_t* scale = mean_r_g_xhat + total;
  scalar_t* tangent_scale = scale + total;
  for (int64_t k = 0; k < total; ++k) {
    const kernels::ForwardStats<scalar_t> s{mean_p[k], invstd_p[k], rx_mean_p[k], r_sigma_p[k]};
    const auto c = kernels::backward_channel<kTangent, scalar_t>(
        sums[k], sums[total + k], sums[2 * total + k], sums[3 * total + k], rows, s, w_p[k],
        vw_p[k]);
    mean_g[k] = c.mean_g;
    mean_g_xhat[k] = c.mean_g_xhat;
    mean_rg[k] = c.mean_rg;
    mean_r_g_xhat[k] = c.mean_r_g_xhat;
    scale[k] = c.scale;
    tangent_scale[k] = c.tangent_scale;
  }
  scalar_t* gx_p = gx.data_ptr<scalar_t>();
  scalar_t* rgx_p = kTangent ? rgx.data_ptr<scalar_t>() : nullptr;
  for_each_element(batch, rows, channels, [&](int64_t row, int64_t i, int64_t k) {
    scalar_t x_hat, rx_hat, g, rg;
    element(row, i, k, x_hat, rx_hat, g, rg);
    const kernels::BackwardCoefficients<scalar_t> c{
        mean_g[k], mean_g_xhat[k], mean_rg[k], mean_r_g_xhat[k], scale[k], tangent_scale[k]};
    scalar_t out, r_out;
    kernels::backward_element<kTangent>(x_hat, rx_hat, g, rg, c, &out, &r_out);
    gx_p[i] = out;
    if (kTangent) rgx_p[i] = r_out;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_backward_cpu(const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent,
                             const at::Tensor& x_in, const OptionalTensor& x_tangent,
                             const OptionalTensor& weight, const OptionalTensor& weight_tangent,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             const OptionalTensor& x_tangent_mean,
                             const OptionalTensor& sigma_tangent, const OptionalTensor& relu_output,
                             bool input_grad) {
  check_task_batch_norm_backward_args(grad_y, grad_y_tangent, x_in, x_tangent, weight,
                                      weight_tangent, mean, invstd, x_tangent_mean, sigma_tangent,
                                      relu_output);
  const bool tangent = given(grad_y_tangent);
  const auto x = x_in.contiguous();
  const auto gy = grad_y.contiguous();
  const auto rgy = contiguous_or_undefined(grad_y_tangent);
  // The input's tangent enters only the tangent outputs.
  const auto rx = tangent ? contiguous_or_undefined(x_tangent) : at::Tensor();
  const auto y = contiguous_or_undefined(relu_output);
  const int64_t batch = x.size(0), rows = x.size(1), channels = x.size(2);
  auto out = backward_outputs(x, batch, channels, tangent, input_grad);
  auto& [gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent] = out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_batch_norm_backward_cpu", [&] {
    const scalar_t* gy_p = gy.data_ptr<scalar_t>();
    const scalar_t* rgy_p = data_or_null<scalar_t>(rgy);
    const scalar_t* y_p = data_or_null<scalar_t>(y);
    with_flag(tangent, [&](auto tangent_flag) {
      with_flag(rx.defined(), [&](auto input_tangent_flag) {
        with_flag(y_p != nullptr, [&](auto relu_flag) {
          constexpr bool kTangent = decltype(tangent_flag)::value;
          constexpr bool kRelu = decltype(relu_flag)::value;
          backward_passes<scalar_t, kTangent, decltype(input_tangent_flag)::value>(
              batch, rows, channels, x, rx, mean, invstd, x_tangent_mean, sigma_tangent, weight,
              weight_tangent,
              [&](int64_t, int64_t i, scalar_t& g, scalar_t& rg) {
                kernels::masked_gradient<kRelu, kTangent>(gy_p, rgy_p, y_p, i, g, rg);
              },
              input_grad, gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent);
        });
      });
    });
  });
  return out;
}

// A stand-in of the CUDA path, as task_batch_norm_relu_max_pool_cpu.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_batch_norm_relu_max_pool_backward_cpu(
    const at::Tensor& grad_y, const OptionalTensor& grad_y_tangent, const at::Tensor& x_in,
    const OptionalTensor& x_tangent, const OptionalTensor& weight,
    const OptionalTensor& weight_tangent, const at::Tensor& mean, const at::Tensor& invstd,
    const OptionalTensor& x_tangent_mean, const OptionalTensor& sigma_tangent,
    const at::Tensor& output, const at::Tensor& argmax, bool input_grad) {
  check_task_batch_norm_relu_max_pool_backward_args(grad_y, grad_y_tangent, x_in, x_tangent, weight,
                                                    weight_tangent, mean, invstd, x_tangent_mean,
                                                    sigma_tangent, output, argmax);
  const bool tangent = given(grad_y_tangent);
  const auto x = x_in.contiguous();
  const auto gy = grad_y.contiguous();
  const auto rgy = contiguous_or_undefined(grad_y_tangent);
  const auto rx = tangent ? contiguous_or_undefined(x_tangent) : at::Tensor();
  const auto y = output.contiguous();
  const auto index = argmax.contiguous();
  const int64_t h = x.size(1), w = x.size(2), channels = x.size(3);
  const int64_t out_h = y.size(1), out_w = y.size(2);
  auto out = backward_outputs(x, 1, channels, tangent, input_grad);
  auto& [gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent] = out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "task_batch_norm_relu_max_pool_backward_cpu", [&] {
    const scalar_t* gy_p = gy.data_ptr<scalar_t>();
    const scalar_t* rgy_p = data_or_null<scalar_t>(rgy);
    const scalar_t* y_p = y.data_ptr<scalar_t>();
    const uint8_t* argmax_p = index.data_ptr<uint8_t>();
    with_flag(tangent, [&](auto tangent_flag) {
      with_flag(rx.defined(), [&](auto input_tangent_flag) {
        constexpr bool kTangent = decltype(tangent_flag)::value;
        backward_passes<scalar_t, kTangent, decltype(input_tangent_flag)::value>(
            1, x.numel() / channels, channels, x, rx, mean, invstd, x_tangent_mean, sigma_tangent,
            weight, weight_tangent,
            // One batch (B = 1): the row is the pixel, the channel i − row·C.
            [&](int64_t pixel, int64_t i, scalar_t& g, scalar_t& rg) {
              kernels::pooled_gradient<kTangent>(gy_p, rgy_p, y_p, argmax_p, pixel / (h * w),
                                                 (pixel / w) % h, pixel % w, i - pixel * channels,
                                                 out_h, out_w, channels, g, rg);
            },
            input_grad, gx, rgx, grad_weight, grad_bias, grad_weight_tangent, grad_bias_tangent);
      });
    });
  });
  return out;
}
