// Launch shape of the CUDA per-channel reduction of x [B, M, C] (cuda/batch_norm_cuda.cu). Plain
// C++, so the CPU tests check it (op task_batch_norm_reduction_plan).
//
// A block of kReductionThreads threads sums a group of adjacent channels over a range of rows:
// channels_per_block lanes of each warp read adjacent channels (coalesced), the remaining threads
// stride over the rows. The rows are split over several blocks where one block per channel group
// would leave the device idle; a second, small kernel adds the splits' partial sums in split
// order. The plan depends only on the shape and the device's multiprocessor count, so the
// summation order, and the result, are the same on every run.
#pragma once

#include <algorithm>
#include <cstdint>

namespace maml_ext {
namespace kernels {

constexpr int64_t kReductionThreads = 256;
constexpr int64_t kWarpSize = 32;
// Below this many rows per thread, a split's fixed costs outweigh its share of the work.
constexpr int64_t kMinRowsPerThread = 16;
constexpr int64_t kMaxGridYZ = 65535;

struct ChannelReductionPlan {
  int64_t channels_per_block;  // a power of two ≤ 32 (divides the warp)
  int64_t row_lanes;           // threads per channel in a block
  int64_t channel_blocks;      // blocks across the channels of one b (grid x)
  int64_t splits;              // blocks across the rows (grid z), none empty
  int64_t rows_per_split;
};

inline ChannelReductionPlan plan_channel_reduction(int64_t batch, int64_t rows, int64_t channels,
                                                   int64_t multiprocessors) {
  ChannelReductionPlan p;
  p.channels_per_block = 1;
  while (p.channels_per_block < kWarpSize && p.channels_per_block < channels) {
    p.channels_per_block *= 2;
  }
  p.row_lanes = kReductionThreads / p.channels_per_block;
  p.channel_blocks = (channels + p.channels_per_block - 1) / p.channels_per_block;
  // About four blocks per multiprocessor, as long as each thread keeps enough rows.
  const int64_t groups = std::max<int64_t>(p.channel_blocks * batch, 1);
  const int64_t wanted = (4 * std::max<int64_t>(multiprocessors, 1) + groups - 1) / groups;
  const int64_t most = std::max<int64_t>(1, rows / (p.row_lanes * kMinRowsPerThread));
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::min(most, kMaxGridYZ));
  p.rows_per_split = (rows + splits - 1) / splits;
  p.splits = (rows + p.rows_per_split - 1) / p.rows_per_split;
  return p;
}

}  // namespace kernels
}  // namespace maml_ext
