// Batch-norm statistics from partial statistics: a producer (the CUDA convolution's epilogue,
// kernels/task_gemm_tile.h, or the CPU convolution) summarises each chunk of a channel's values,
// and the batch norm merges the chunks instead of re-reading its input twice. Per chunk, over its
// values y (with tangents r = R{y}):
//   count, mean, M2 = Σ (y − mean)², sum_r = Σ r, co_moment = Σ (y − mean) r.
// Chunks merge by Chan et al.'s pairwise update (and its analogue for the co-moment), which
// stays accurate where Σ y² − n·mean² would cancel; every merge runs in a fixed order, so the
// result is deterministic. Written once for host and device (CPU and CUDA kernels share it).
//
// Stored layout: kPartialFields values per (chunk, channel), in PartialStats order; the chunks of
// channel k of x [B, M, C] (k = b·C + c) at partials[(p·B·C + k)·kPartialFields + field].
#pragma once

#include <cstdint>

#include "batch_norm_math.h"
#include "host_device.h"

namespace maml_ext {
namespace kernels {

constexpr int kPartialFields = 5;

template <typename acc_t>
struct PartialStats {
  acc_t count, mean, m2, sum_r, co_moment;
};

template <typename acc_t>
MAML_HOST_DEVICE PartialStats<acc_t> empty_partial() {
  return {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// The union of two disjoint chunks a and b. With n = n_a + n_b and δ = mean_b − mean_a:
//   mean = mean_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n,
//   co_moment = C_a + C_b + δ (n_a sum_r_b − n_b sum_r_a) / n
// (each chunk's deviations shift by its mean's distance from the union's mean; Σ (y − mean_a)
// over a is 0, so only the sum_r terms pick the shift up).
template <typename acc_t>
MAML_HOST_DEVICE PartialStats<acc_t> merge_partials(const PartialStats<acc_t>& a,
                                                    const PartialStats<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t n = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t share_b = b.count / n;
  PartialStats<acc_t> m;
  m.count = n;
  m.mean = a.mean + delta * share_b;
  m.m2 = a.m2 + b.m2 + delta * delta * a.count * share_b;
  m.sum_r = a.sum_r + b.sum_r;
  m.co_moment = a.co_moment + b.co_moment + delta * (a.count * b.sum_r - b.count * a.sum_r) / n;
  return m;
}

// Adds one value y with tangent r (0 without one): Welford's update, as a merge with {y}.
template <typename acc_t, typename scalar_t>
MAML_HOST_DEVICE void add_value(PartialStats<acc_t>& s, scalar_t y, scalar_t r) {
  const PartialStats<acc_t> one{acc_t(1), static_cast<acc_t>(y), acc_t(0), static_cast<acc_t>(r),
                                acc_t(0)};
  s = merge_partials(s, one);
}

template <typename acc_t, typename scalar_t>
MAML_HOST_DEVICE PartialStats<acc_t> load_partial(const scalar_t* p) {
  return {static_cast<acc_t>(p[0]), static_cast<acc_t>(p[1]), static_cast<acc_t>(p[2]),
          static_cast<acc_t>(p[3]), static_cast<acc_t>(p[4])};
}

template <typename acc_t, typename scalar_t>
MAML_HOST_DEVICE void store_partial(const PartialStats<acc_t>& s, scalar_t* p) {
  p[0] = static_cast<scalar_t>(s.count);
  p[1] = static_cast<scalar_t>(s.mean);
  p[2] = static_cast<scalar_t>(s.m2);
  p[3] = static_cast<scalar_t>(s.sum_r);
  p[4] = static_cast<scalar_t>(s.co_moment);
}

// Channel k's statistics from its `chunks` partials (of `total` = B·C channels), merged in chunk
// order; `count` is the channel's number of values (the chunks' counts add up to it).
template <bool kTangent, typename scalar_t, typename acc_t>
MAML_HOST_DEVICE ForwardStats<scalar_t> forward_channel_from_partials(const scalar_t* partials,
                                                                      int64_t chunks, int64_t total,
                                                                      int64_t k, int64_t count,
                                                                      double eps) {
  PartialStats<acc_t> s = empty_partial<acc_t>();
  for (int64_t p = 0; p < chunks; ++p) {
    s = merge_partials(s, load_partial<acc_t>(partials + (p * total + k) * kPartialFields));
  }
  return forward_channel<kTangent, scalar_t>(static_cast<scalar_t>(s.mean), s.m2, s.sum_r,
                                             s.co_moment, count, eps);
}

}  // namespace kernels
}  // namespace maml_ext
