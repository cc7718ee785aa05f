// The conv2d kernels for avx2: conv2d_simd.inc at 8 floats per vector.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "conv2d.h"

// After every #include, so that only this file's own functions are compiled for avx2.
#pragma GCC target("avx2,fma")
namespace qk {
// Lanes i < n all ones: the mask operand of AVX2's masked loads and stores.
inline __m256i avx2_lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
}  // namespace qk

#define QK_CONV_VEC_FLOATS 8
#define QK_CONV_FMA(a, b, c) ((vfloat)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define QK_CONV_LOAD_N(p, n) ((vfloat)_mm256_maskload_ps((p), qk::avx2_lane_mask(n)))
#define QK_CONV_STORE_N(p, v, n) _mm256_maskstore_ps((p), qk::avx2_lane_mask(n), (__m256)(v))
#define QK_CONV_STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
// As for avx512 (conv2d_avx512.cpp): the packs and the byte shuffle work within 128-bit lanes here too.
#define QK_CONV_PACK_QUADS(c0, c1, c2, c3)                                                                  \
  ((vint)_mm256_shuffle_epi8(                                                                              \
      _mm256_packs_epi16(_mm256_packs_epi32((__m256i)(c0), (__m256i)(c1)),                                   \
                         _mm256_packs_epi32((__m256i)(c2), (__m256i)(c3))),                                  \
      _mm256_set_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400, 0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400)))
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& avx2_conv_kernels() {
  static const ConvKernels table{"avx2", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, quantize_quads, quantize_quads_nhwc, tap_quads,
                                 subsample, reorder_taps, depthwise_plane, depthwise_nhwc};
  return table;
}

}  // namespace qk
