// AVX2 weight-only linear with float activations: the linear_f32 slot of the avx2 table.
//
// AVX2 has no 16-entry float table lookup, so int4 codes are decoded arithmetically: 8 bytes zero-extended to
// dwords give lane j = byte j, whose low nibble (& 0xF) is element 2j and whose high nibble (>> 4) is element
// 2j+1. Subtracting the zero point in integers before the conversion keeps (code - zero) exact; the group's
// scale multiplies the group's partial sums once at its end. x is staged once per call as float32 in that
// order (per 16 elements: the 8 even, then the 8 odd), so the nibbles are never shuffled.
// int8 weights are sign-extended and converted the same way, 8 per step.
//
// As in the AVX-512 kernel, weights are read once per call for up to 8 activation rows, and larger M is cut
// into blocks of 8 that revisit a tile of 16 weight rows while it is still in cache.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "linear_f32.h"

#pragma GCC target("avx2,fma")

#include "dequantize_rows.h"

namespace qk {
namespace {

constexpr int kLanes = 8;                  // floats per ymm
constexpr int64_t kChunkBytes = 8;         // weight bytes decoded per step and row
constexpr int kMaxRowsPerPass = 8;         // activation rows sharing one pass over a weight row
constexpr int64_t kTileRows = 16;          // weight rows revisited by successive blocks of 8 activation rows
constexpr int64_t kStageFloats = 1 << 16;  // staged activations per thread (256 KB), but at least 8 rows

struct Job {
  WeightView w;
  const float* xs;    // staged activations of this pass, row i at xs + i * xs_stride
  int64_t xs_stride;
  int64_t chunks;     // 8-byte chunks that cover columns [0, k)
  const float* bias;  // [w.n] or nullptr
  float* y;           // output rows of this pass, row i at y + i * w.n
};

// Weight rows per pass: R * M partial sums and R * M totals should fit the 16 ymm registers.
constexpr int rows_for(int m) { return m <= 1 ? 4 : m <= 2 ? 2 : 1; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The 8 bytes of chunk c of a row, zero past the row's end (the last chunk of a row may be partial).
inline __m128i load_chunk(const uint8_t* row, int64_t row_bytes, int64_t c) {
  const int64_t at = c * kChunkBytes;
  if (at + kChunkBytes <= row_bytes) return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + at));
  uint8_t tail[kChunkBytes] = {};
  std::memcpy(tail, row + at, static_cast<size_t>(row_bytes - at));
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail));
}

// Accumulates weight rows [n, n + R) against activation rows [m0, m0 + M). A chunk is 8 bytes: 16 int4
// elements (two vectors, even then odd) or 8 int8 elements (one vector).
template <int Bits, int R, int M>
void run_pass(const Job& job, int64_t n, int64_t m0) {
  constexpr int kVectors = Bits == 4 ? 2 : 1;  // float vectors per chunk
  const WeightView& w = job.w;
  const int64_t row_bytes = w.row_bytes(), n_groups = w.n_groups();
  // group_len is a multiple of 16 (so of a chunk's elements) unless there is one group per row.
  const int64_t chunks_per_group = n_groups == 1 ? job.chunks : w.group_len / (kVectors * kLanes);
  const uint8_t* q[R];
  RowGroups groups[R];
  for (int r = 0; r < R; ++r) {
    q[r] = static_cast<const uint8_t*>(w.qdata) + (n + r) * row_bytes;
    groups[r] = RowGroups(w, n + r);
  }
  __m256 total[R][M], part[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) total[r][i] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < job.chunks; c0 += chunks_per_group) {
    const int64_t c1 = std::min(c0 + chunks_per_group, job.chunks), g = c0 / chunks_per_group;
    __m256i zero[R];
    for (int r = 0; r < R; ++r) {
      zero[r] = _mm256_set1_epi32(groups[r].zero_of(g));
      for (int i = 0; i < M; ++i) part[r][i] = _mm256_setzero_ps();
    }
    for (int64_t c = c0; c < c1; ++c) {
      __m256 wv[R][kVectors];
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = load_chunk(q[r], row_bytes, c);
        if constexpr (Bits == 8) {
          wv[r][0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        } else {
          const __m256i v = _mm256_cvtepu8_epi32(bytes);
          const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0xF)), hi = _mm256_srli_epi32(v, 4);
          wv[r][0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, zero[r]));
          wv[r][kVectors - 1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, zero[r]));
        }
      }
      const float* xc = job.xs + m0 * job.xs_stride + c * kVectors * kLanes;
      for (int h = 0; h < kVectors; ++h)
        for (int i = 0; i < M; ++i) {
          const __m256 xv = _mm256_load_ps(xc + i * job.xs_stride + h * kLanes);
          for (int r = 0; r < R; ++r) part[r][i] = _mm256_fmadd_ps(wv[r][h], xv, part[r][i]);
        }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(groups[r].scale[g]);
      for (int i = 0; i < M; ++i) total[r][i] = _mm256_fmadd_ps(part[r][i], s, total[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = job.bias ? job.bias[n + r] : 0.0f;
    for (int i = 0; i < M; ++i) job.y[(m0 + i) * w.n + n + r] = hsum(total[r][i]) + b;
  }
}

template <int Bits, int M>
void run_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = rows_for(M);
  int64_t n = n0;
  for (; n + R <= n1; n += R) run_pass<Bits, R, M>(job, n, m0);
  for (; n < n1; ++n) run_pass<Bits, 1, M>(job, n, m0);
}

template <int Bits>
void run_rows(int64_t m, const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  switch (m) {
    case 1: return run_rows<Bits, 1>(job, n0, n1, m0);
    case 2: return run_rows<Bits, 2>(job, n0, n1, m0);
    case 3: return run_rows<Bits, 3>(job, n0, n1, m0);
    case 4: return run_rows<Bits, 4>(job, n0, n1, m0);
    case 5: return run_rows<Bits, 5>(job, n0, n1, m0);
    case 6: return run_rows<Bits, 6>(job, n0, n1, m0);
    case 7: return run_rows<Bits, 7>(job, n0, n1, m0);
    default: return run_rows<Bits, 8>(job, n0, n1, m0);
  }
}

// Converts x[0..k) to float32 into out[0..len), zero past k. float16 goes through the scalar conversion
// because the avx2 table is chosen on AVX2 + FMA alone, which does not promise F16C.
void load_row(const void* x, ActType type, int64_t k, int64_t len, float* out) {
  int64_t i = 0;
  if (type == ActType::f32)
    for (; i + kLanes <= k; i += kLanes) _mm256_store_ps(out + i, _mm256_loadu_ps(static_cast<const float*>(x) + i));
  if (type == ActType::bf16)
    for (; i + kLanes <= k; i += kLanes) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      _mm256_store_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  for (; i < len; ++i) out[i] = i < k ? act_value(x, type, i) : 0.0f;
}

// Stages activation rows in the order the weight decode produces elements (see the top of this file).
void stage_rows(const void* x, ActType type, int bits, int64_t rows, int64_t k, int64_t len, float* out) {
  float* plain = bits == 8 ? nullptr : staging_buffer(1, len);
  for (int64_t i = 0; i < rows; ++i) {
    const void* row = static_cast<const char*>(x) + i * k * act_bytes(type);
    float* dst = out + i * len;
    if (bits == 8) {
      load_row(row, type, k, len, dst);
      continue;
    }
    load_row(row, type, k, len, plain);
    for (int64_t c = 0; c < len; c += 2 * kLanes)
      for (int j = 0; j < kLanes; ++j) {
        dst[c + j] = plain[c + 2 * j];
        dst[c + kLanes + j] = plain[c + 2 * j + 1];
      }
  }
}

}  // namespace

void linear_f32_avx2(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                     int64_t n_begin, int64_t n_end) {
  const int64_t chunk = w.bits == 4 ? 2 * kChunkBytes : kChunkBytes;  // elements per chunk
  const int64_t chunks = (w.k + chunk - 1) / chunk, len = chunks * chunk;
  const int64_t rows_per_stage = std::min(m, std::max<int64_t>(kMaxRowsPerPass, kStageFloats / len));
  float* staged = staging_buffer(0, rows_per_stage * len);
  for (int64_t s0 = 0; s0 < m; s0 += rows_per_stage) {
    const int64_t rows = std::min(rows_per_stage, m - s0);
    stage_rows(static_cast<const char*>(x) + s0 * w.k * act_bytes(x_type), x_type, w.bits, rows, w.k, len, staged);
    const Job job{w, staged, len, chunks, bias, y + s0 * w.n};
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, n_end);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRowsPerPass) {
        const int64_t mb = std::min<int64_t>(kMaxRowsPerPass, rows - m0);
        if (w.bits == 4)
          run_rows<4>(mb, job, n0, n1, m0);
        else
          run_rows<8>(mb, job, n0, n1, m0);
      }
    }
  }
}

void dequantize_rows_avx2(const WeightView& w, int64_t n_begin, int64_t n_end, float* out) {
  dequantize_rows_loop(w, n_begin, n_end, out);
}

}  // namespace qk
