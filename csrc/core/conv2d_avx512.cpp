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
// Round to nearest even and convert in one instruction (embedded rounding: whatever the MXCSR says). The
// zero-masked form with every lane set: GCC 12's unmasked one warns of its own undefined pass-through operand.
#define QK_CONV_ROUND_INT(v)                                                 \
  ((vint)_mm512_maskz_cvt_roundps_epi32(static_cast<__mmask16>(0xFFFF), (__m512)(v), \
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
// Codes (|c| <= 127, so the saturating packs are exact) of four channels into words: the packs leave each 128-bit
// lane holding 4 pixels of channel 0, then of 1, 2, 3; one in-lane byte shuffle transposes that 4 x 4.
#define QK_CONV_PACK_QUADS(c0, c1, c2, c3)                                                                  \
  ((vint)_mm512_shuffle_epi8(                                                                              \
      _mm512_packs_epi16(_mm512_packs_epi32((__m512i)(c0), (__m512i)(c1)),                                   \
                         _mm512_packs_epi32((__m512i)(c2), (__m512i)(c3))),                                  \
      _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400)))
// Codes of four pixels (16 channels each) into words: the same packs, which leave 128-bit lane L holding channels
// 4L..4L + 3 of pixel 0, 1, 2, 3: quad L's words for the four pixels, as quantize_quads_nhwc stores them.
#define QK_CONV_PACK_PIXEL_QUADS(p0, p1, p2, p3)                                                            \
  ((vint)_mm512_packs_epi16(_mm512_packs_epi32((__m512i)(p0), (__m512i)(p1)),                               \
                            _mm512_packs_epi32((__m512i)(p2), (__m512i)(p3))))
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& avx512_conv_kernels() {
  static const ConvKernels table{"avx512", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, quantize_quads, quantize_quads_nhwc, tap_quads,
                                 subsample, reorder_taps, depthwise_plane, depthwise_nhwc};
  return table;
}

}  // namespace qk
