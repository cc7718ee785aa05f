// The conv2d kernels for avx512: conv2d_simd.inc at 16 floats per vector.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "conv2d.h"

// After every #include, so that only this file's own functions are compiled for avx512.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define QK_CONV_VEC_FLOATS 16
#define QK_CONV_FMA(a, b, c) ((vfloat)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#define QK_CONV_LOAD_N(p, n) ((vfloat)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n)) - 1), (p)))
#define QK_CONV_STORE_N(p, v, n) _mm512_mask_storeu_ps((p), static_cast<__mmask16>((1u << (n)) - 1), (__m512)(v))
#define QK_CONV_STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& avx512_conv_kernels() {
  static const ConvKernels table{"avx512", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, quantize_quads, reorder_taps, depthwise_plane,
                                 depthwise_nhwc};
  return table;
}

}  // namespace qk
