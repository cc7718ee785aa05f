// Inline AVX-512 helpers shared by the files compiled for AVX-512 (linear_a8_avx512.cpp, linear_a8_amx.cpp).
// Include it after <immintrin.h> and after the file's `#pragma GCC target` enabling avx512f and avx512bw, so
// that these functions are compiled for that target; it includes nothing itself.
#pragma once

namespace qk::simd512 {

// Up to 64 bytes at p, of which `avail` may be read; zero past them.
inline __m512i load_bytes(const void* p, int64_t avail) {
  if (avail >= 64) return _mm512_loadu_si512(p);
  if (avail <= 0) return _mm512_setzero_si512();
  return _mm512_maskz_loadu_epi8((__mmask64{1} << avail) - 1, p);
}

// Transposes 16 rows of 16 int32 lanes: afterwards r[j] lane i holds what r[i] lane j held.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // lane pairs of row pairs: per 128-bit part [a0 b0 a1 b1], [a2 b2 a3 b3]
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c]: column 4L + c of rows i..i+3 in 128-bit part L
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather part L of r[c], r[4 + c], r[8 + c], r[12 + c] into row 4L + c
    const __m512i even_a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);  // parts 0, 2 of each
    const __m512i odd_a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);   // parts 1, 3
    const __m512i even_b = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i odd_b = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(even_a, even_b, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(even_a, even_b, 0xdd);
    t[4 + c] = _mm512_shuffle_i32x4(odd_a, odd_b, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(odd_a, odd_b, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The first `valid` (1 to 16) lanes of y to dst; a whole vector that starts on a cache line goes around the caches
// when stream (the caller fences).
inline void store_lanes(float* dst, __m512 y, int64_t valid, bool stream) {
  if (valid < 16)
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << valid) - 1), y);
  else if (stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0)
    _mm512_stream_ps(dst, y);
  else
    _mm512_storeu_ps(dst, y);
}

// One output row piece of a planar conv product (amx::planar_a8, avx512::planar_a8): for the `valid` (1 to 16)
// sums from `sums` on, (sums * w_scale) * x_scale + bias, NaN throughout where x_scale is not finite, stored to
// dst; a whole aligned vector goes around the caches when stream. Reads no sum past the valid ones.
inline void store_planar(const int32_t* sums, __m512 w_scale, __m512 x_scale, bool finite, __m512 bias, float* dst,
                         int64_t valid, bool stream) {
  const __mmask16 keep = valid < 16 ? static_cast<__mmask16>((1u << valid) - 1) : __mmask16(0xFFFF);
  const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(keep, sums)), w_scale);
  store_lanes(dst, finite ? _mm512_fmadd_ps(v, x_scale, bias) : _mm512_set1_ps(__builtin_nanf("")), valid, stream);
}

}  // namespace qk::simd512
