// Index math of the task-batched convolution as implicit matrix products, written once for host
// and device: the CUDA kernels and the CPU emulation of their tiles (cpu/task_conv_emulation.cpp)
// call the same functions, so the CPU tests check the addressing the GPU runs.
//
// Activations are stored as the op contract says (csrc/task_conv.h): [N, T, C, H, W] in memory
// order N, H, W, T, C. Weights are [T, O, C, kh, kw], contiguous within a task; the task offset is
// added by the caller (its stride may be 0 where all tasks share the weights).
//
// Each pass is, per task t, out = A · B (and, carrying tangents, out_tangent = A · RB + RA · B):
//   forward          rows (n, ho, wo)  reduction (i, j, c)   columns o          A = x,  B = W
//   backward data    rows (n, h, w)    reduction (i, j, o)   columns c          A = gy, B = W
//   weight gradient  rows o            reduction (n, ho, wo) columns (i, j, c)  A = gy, B = x
// A zero offset of -1 marks an element that is zero (padding, or between strides).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace maml_ext {
namespace kernels {

struct ConvGeometry {
  int64_t batch, tasks, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int64_t out_h, out_w;
};

// Needs input + 2 padding >= kernel (the op checks it).
MAML_HOST_DEVICE int64_t conv_output_size(int64_t input, int64_t kernel, int64_t stride,
                                          int64_t padding) {
  return (input + 2 * padding - kernel) / stride + 1;
}

// The input coordinate that output coordinate `out` reads at kernel offset `offset`; outside
// [0, input size) it is padding.
MAML_HOST_DEVICE int64_t input_coordinate(int64_t out, int64_t offset, int64_t stride,
                                          int64_t padding) {
  return out * stride - padding + offset;
}

// The output coordinate that reads input coordinate `in` at kernel offset `offset`, or -1 where
// none does (the input falls between strides, or the output would lie outside [0, out_size)).
MAML_HOST_DEVICE int64_t output_coordinate(int64_t in, int64_t offset, int64_t stride,
                                           int64_t padding, int64_t out_size) {
  const int64_t shifted = in + padding - offset;
  if (shifted < 0 || shifted % stride != 0) {
    return -1;
  }
  const int64_t out = shifted / stride;
  return out < out_size ? out : -1;
}

// Offset of element (n, h, w, task t, channel c) of an activation stored N, H, W, T, C.
MAML_HOST_DEVICE int64_t activation_offset(int64_t n, int64_t h, int64_t w, int64_t t, int64_t c,
                                           int64_t height, int64_t width, int64_t tasks,
                                           int64_t channels) {
  return (((n * height + h) * width + w) * tasks + t) * channels + c;
}

// Offset of W[o, c, i, j] within one task's [O, C, kh, kw] weights.
MAML_HOST_DEVICE int64_t weight_offset(const ConvGeometry& g, int64_t o, int64_t c, int64_t i,
                                       int64_t j) {
  return ((o * g.in_channels + c) * g.kernel_h + i) * g.kernel_w + j;
}

// A reduction or column index (i, j, ch) with the channel fastest (contiguous in activations).
struct KernelTap {
  int64_t i, j, channel;
};

MAML_HOST_DEVICE KernelTap decode_tap(int64_t index, int64_t channels, int64_t kernel_w) {
  const int64_t ij = index / channels;
  return {ij / kernel_w, ij % kernel_w, index - ij * channels};
}

// A row index (n, h, w) of a map of size height x width.
struct Pixel {
  int64_t n, h, w;
};

MAML_HOST_DEVICE Pixel decode_pixel(int64_t index, int64_t height, int64_t width) {
  const int64_t nh = index / width;
  return {nh / height, nh % height, index - nh * width};
}

// y = conv(x, W): A[(n,ho,wo), (i,j,c)] = x[n, ho·s−p+i, wo·s−p+j, t, c], B[(i,j,c), o] =
// W[o,c,i,j].
struct ForwardGemm {
  ConvGeometry g;
  static constexpr bool kARowFastest = false;  // consecutive reduction indices are contiguous in x

  MAML_HOST_DEVICE int64_t rows() const { return g.batch * g.out_h * g.out_w; }
  MAML_HOST_DEVICE int64_t cols() const { return g.out_channels; }
  MAML_HOST_DEVICE int64_t reduction() const { return g.kernel_h * g.kernel_w * g.in_channels; }

  MAML_HOST_DEVICE int64_t a_offset(int64_t t, int64_t row, int64_t red) const {
    const Pixel p = decode_pixel(row, g.out_h, g.out_w);
    const KernelTap k = decode_tap(red, g.in_channels, g.kernel_w);
    const int64_t h = input_coordinate(p.h, k.i, g.stride_h, g.pad_h);
    const int64_t w = input_coordinate(p.w, k.j, g.stride_w, g.pad_w);
    if (h < 0 || h >= g.in_h || w < 0 || w >= g.in_w) {
      return -1;
    }
    return activation_offset(p.n, h, w, t, k.channel, g.in_h, g.in_w, g.tasks, g.in_channels);
  }

  MAML_HOST_DEVICE int64_t b_offset(int64_t, int64_t red, int64_t col) const {
    const KernelTap k = decode_tap(red, g.in_channels, g.kernel_w);
    return weight_offset(g, col, k.channel, k.i, k.j);
  }

  MAML_HOST_DEVICE int64_t out_offset(int64_t t, int64_t row, int64_t col) const {
    return (row * g.tasks + t) * g.out_channels + col;
  }
};

// gx = conv_input_grad(gy, W): A[(n,h,w), (i,j,o)] = gy[n, ho, wo, t, o] where ho·s−p+i = h (and
// likewise w), else 0; B[(i,j,o), c] = W[o,c,i,j].
struct BackwardDataGemm {
  ConvGeometry g;
  static constexpr bool kARowFastest = false;  // consecutive reduction indices are contiguous in gy

  MAML_HOST_DEVICE int64_t rows() const { return g.batch * g.in_h * g.in_w; }
  MAML_HOST_DEVICE int64_t cols() const { return g.in_channels; }
  MAML_HOST_DEVICE int64_t reduction() const { return g.kernel_h * g.kernel_w * g.out_channels; }

  MAML_HOST_DEVICE int64_t a_offset(int64_t t, int64_t row, int64_t red) const {
    const Pixel p = decode_pixel(row, g.in_h, g.in_w);
    const KernelTap k = decode_tap(red, g.out_channels, g.kernel_w);
    const int64_t ho = output_coordinate(p.h, k.i, g.stride_h, g.pad_h, g.out_h);
    const int64_t wo = output_coordinate(p.w, k.j, g.stride_w, g.pad_w, g.out_w);
    if (ho < 0 || wo < 0) {
      return -1;
    }
    return activation_offset(p.n, ho, wo, t, k.channel, g.out_h, g.out_w, g.tasks, g.out_channels);
  }

  MAML_HOST_DEVICE int64_t b_offset(int64_t, int64_t red, int64_t col) const {
    const KernelTap k = decode_tap(red, g.out_channels, g.kernel_w);
    return weight_offset(g, k.channel, col, k.i, k.j);
  }

  MAML_HOST_DEVICE int64_t out_offset(int64_t t, int64_t row, int64_t col) const {
    return (row * g.tasks + t) * g.in_channels + col;
  }
};

// gW = conv_weight_grad(x, gy): A[o, (n,ho,wo)] = gy[n, ho, wo, t, o],
// B[(n,ho,wo), (i,j,c)] = x[n, ho·s−p+i, wo·s−p+j, t, c]; written to [T, O, C, kh, kw].
struct WeightGradGemm {
  ConvGeometry g;
  static constexpr bool kARowFastest = true;  // consecutive rows (output channels) are contiguous

  MAML_HOST_DEVICE int64_t rows() const { return g.out_channels; }
  MAML_HOST_DEVICE int64_t cols() const { return g.kernel_h * g.kernel_w * g.in_channels; }
  MAML_HOST_DEVICE int64_t reduction() const { return g.batch * g.out_h * g.out_w; }

  MAML_HOST_DEVICE int64_t a_offset(int64_t t, int64_t row, int64_t red) const {
    return (red * g.tasks + t) * g.out_channels + row;
  }

  MAML_HOST_DEVICE int64_t b_offset(int64_t t, int64_t red, int64_t col) const {
    const Pixel p = decode_pixel(red, g.out_h, g.out_w);
    const KernelTap k = decode_tap(col, g.in_channels, g.kernel_w);
    const int64_t h = input_coordinate(p.h, k.i, g.stride_h, g.pad_h);
    const int64_t w = input_coordinate(p.w, k.j, g.stride_w, g.pad_w);
    if (h < 0 || h >= g.in_h || w < 0 || w >= g.in_w) {
      return -1;
    }
    return activation_offset(p.n, h, w, t, k.channel, g.in_h, g.in_w, g.tasks, g.in_channels);
  }

  MAML_HOST_DEVICE int64_t out_offset(int64_t t, int64_t row, int64_t col) const {
    const KernelTap k = decode_tap(col, g.in_channels, g.kernel_w);
    return t * g.out_channels * cols() + weight_offset(g, row, k.channel, k.i, k.j);
  }
};

// The pointers of one implicit product. Tangent operands may be null (a zero tangent); out_tangent
// null: no tangent is computed. Task strides are 0 for activations (the task is in the offset)
// and may be 0 for weights shared by all tasks. Partial sums of split k (see GemmTiling) go to
// out + split · split_stride. bias (forward only) is added in the epilogue: bias[t·stride + col].
// statistics (forward only, one split; null: none): each block's batch-norm partial statistics of
// its rows per column, [grid_m, T, cols, kPartialFields] (kernels/batch_norm_partials.h).
template <typename scalar_t>
struct GemmOperands {
  const scalar_t* a;
  const scalar_t* a_tangent;
  const scalar_t* b;
  const scalar_t* b_tangent;
  int64_t a_task_stride, a_tangent_task_stride, b_task_stride, b_tangent_task_stride;
  const scalar_t* bias;
  const scalar_t* bias_tangent;
  int64_t bias_task_stride, bias_tangent_task_stride;
  scalar_t* out;
  scalar_t* out_tangent;
  int64_t split_stride;
  scalar_t* statistics;
};

}  // namespace kernels
}  // namespace maml_ext
