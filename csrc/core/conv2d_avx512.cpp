// The conv2d kernels for avx512: conv2d_simd.inc at 16 floats per vector.
#include <cmath>
#include <cstdint>
#include <limits>

#include "conv2d.h"

// After every #include, so that only this file's own functions are compiled for avx512.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define QK_CONV_VEC_FLOATS 16
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& avx512_conv_kernels() {
  static const ConvKernels table{"avx512", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, reorder_taps, depthwise_plane,
                                 depthwise_nhwc};
  return table;
}

}  // namespace qk
