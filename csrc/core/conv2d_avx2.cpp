// The conv2d kernels for avx2: conv2d_simd.inc at 8 floats per vector.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "conv2d.h"

// After every #include, so that only this file's own functions are compiled for avx2.
#pragma GCC target("avx2,fma")
#define QK_CONV_VEC_FLOATS 8
#define QK_CONV_FMA(a, b, c) ((vfloat)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& avx2_conv_kernels() {
  static const ConvKernels table{"avx2", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, reorder_taps, depthwise_plane,
                                 depthwise_nhwc};
  return table;
}

}  // namespace qk
