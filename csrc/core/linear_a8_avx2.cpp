// AVX2 kernels for dynamic int8 activations: linear_a8 (vpmaddubsw + vpmaddwd over weight panels packed per
// call) and quantize_rows. The panels and the blocking are those of linear_a8_plan.h, 16 columns wide.
//
// vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16 with saturation, so each weight
// format takes the operand signs under which no pair can saturate:
//   int4: u = xq + 128 (0..255) against w = code - zero (-15..15): a pair is at most 2 * 255 * 15 = 7650, and four
//         steps summed in int16 stay below 30600 < 32767 before vpmaddwd widens them.
//   int8: w spans -128..127, and u * w pairs would reach 2 * 255 * 128. Instead |w| (0..128) meets xq with the sign
//         of w applied (vpsignb; |xq| <= 127 because quantize_rows never produces -128): a pair is at most
//         2 * 128 * 127 = 32512 < 32767, widened after every step. No correction term is needed.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "linear_a8.h"
#include "linear_a8_plan.h"
#include "reference.h"

// After every #include, so that only this file's own functions are compiled for AVX2.
#pragma GCC target("avx2,fma")

namespace qk::avx2 {
namespace {

using a8::kKBlock;
using a8::kMChunk;
using a8::kStep;

// int32 lanes per ymm; a panel is two ymm of columns wide.
constexpr int kLanes = 8;
constexpr int kNr = 2 * kLanes;
// Rows per microkernel tile: 4 rows x 2 ymm = 8 int32 accumulators, plus broadcasts and temporaries, fill the 16
// ymm registers; float accumulators live in memory and are updated once per segment.
constexpr int kMr = 4;
constexpr int64_t kMaxSegments = kKBlock / 32;

// Up to 32 bytes at p, of which `avail` may be read; zero past them.
inline __m256i load_bytes(const void* p, int64_t avail) {
  if (avail >= 32) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  alignas(32) uint8_t tail[32] = {};
  if (avail > 0) std::memcpy(tail, p, avail);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
}

// Transposes 8 rows of 8 int32 lanes: afterwards r[j] lane i holds what r[i] lane j held.
inline void transpose8x8(__m256i r[8]) {
  __m256i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r[i + c]: lanes c and 4 + c of rows i..i+3, one per 128-bit half
    r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// Stages `rows` rows of xq (k_pad columns) in rows of k_round bytes, `stride` apart, zero-padded (as xq = 0).
// int4: as u = xq + 128, de-interleaved within every 8 elements to meet the nibble order of the panels.
// int8: as xq itself, for the sign trick.
void stage_activations(const int8_t* xq, int64_t rows, int64_t k_pad, int64_t k_round, int64_t stride, bool int4,
                       uint8_t* out) {
  const __m256i flip = _mm256_set1_epi8(int4 ? static_cast<char>(0x80) : 0);
  const __m256i deinterleave = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,  //
                                                0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k_round; i += 32) {
      __m256i v = _mm256_xor_si256(load_bytes(xq + r * k_pad + i, k_pad - i), flip);
      if (int4) v = _mm256_shuffle_epi8(v, deinterleave);
      uint8_t* dst = out + r * stride + i;
      if (k_round - i >= 32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
      } else {  // k_round is a multiple of 16
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(v));
      }
    }
  }
}

struct PanelBlock {
  int32_t* weights;      // [steps][kNr] lanes of 4 weights
  int32_t* corrections;  // [segment][kNr]: -128 * sum of the segment's weights (int4 only)
  float* scales;         // [segment][kNr]
};

// Packs block b of output columns [n0, n0 + ncols), ncols <= kNr; missing columns get zero weights and scales.
void pack_block(const WeightView& w, const a8::Plan& plan, int64_t b, int64_t n0, int64_t ncols, PanelBlock p) {
  const int64_t begin = plan.block_begin(b), len = plan.block_len(b), steps = len / kStep;
  const int64_t seg_len = plan.segment_len(b), n_seg = plan.n_segments(b), row_bytes = w.row_bytes();
  const auto* qdata = static_cast<const uint8_t*>(w.qdata);
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t c0 = half * kLanes, n = n0 + c0;
    const int64_t valid = std::clamp<int64_t>(ncols - c0, 0, kLanes);
    __m256i zero[kMaxSegments];  // per segment: each column's zero point in all 4 bytes of its lane
    for (int64_t s = 0; s < n_seg; ++s) {
      const int64_t g = plan.group_of(b, s);
      for (int64_t i = 0; i < kLanes; ++i) p.scales[s * kNr + c0 + i] = i < valid ? w.scale[(n + i) * w.n_groups() + g] : 0.0f;
      alignas(32) int32_t zero4[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) zero4[i] = i < valid ? w.zero(n + i, g) * 0x01010101 : 0;
      zero[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(zero4));
    }
    __m256i rows[kLanes];
    auto load_rows = [&](int64_t offset, int64_t avail) {
      for (int64_t i = 0; i < kLanes; ++i)
        rows[i] = i < valid ? load_bytes(qdata + (n + i) * row_bytes + offset, avail) : _mm256_setzero_si256();
    };
    auto store = [&](int64_t step, __m256i v) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.weights + step * kNr + c0), v);
    };
    if (w.bits == 8) {
      for (int64_t e = 0; e < len; e += 32) {  // 32 elements of each row: 8 steps
        load_rows(begin + e, w.k_pad - begin - e);
        transpose8x8(rows);
        for (int64_t j = 0; j < 8 && e / kStep + j < steps; ++j) store(e / kStep + j, rows[j]);
      }
      continue;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t e = 0; e < len; e += 64) {  // 32 bytes of each row: 64 elements, 16 steps
      const int64_t byte = (begin + e) / 2;
      load_rows(byte, row_bytes - byte);
      transpose8x8(rows);
      // rows[d] lane i: stored bytes 4d..4d+3 of column i, elements e + 8d .. e + 8d + 7.
      for (int64_t d = 0; d < 8 && e / kStep + 2 * d < steps; ++d) {
        const __m256i z = zero[(e + 8 * d) / seg_len];
        store(e / kStep + 2 * d, _mm256_sub_epi8(_mm256_and_si256(rows[d], low), z));
        store(e / kStep + 2 * d + 1, _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(rows[d], 4), low), z));
      }
    }
    // Each lane's 4 weights summed: vpmaddubsw against all-ones bytes, then vpmaddwd against all-ones words.
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const int64_t seg_steps = seg_len / kStep;
    for (int64_t s = 0; s < n_seg; ++s) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t j = s * seg_steps; j < (s + 1) * seg_steps; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.weights + j * kNr + c0));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.corrections + s * kNr + c0),
                          _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 7)));
    }
  }
}

inline __m256i broadcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// acc[r][c] (+)= scale[c] * integer segment sum, over the block's segments. int4: unsigned staged activations,
// 4 steps per int16 sum (see the top of the file); the integer sums start at the panel's corrections.
// Overflow: |sum| <= 512 * 255 * 15 + 128 * 512 * 15 per block segment, far inside int32.
template <int MR>
void tile_int4(const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg, int64_t seg_steps, float* acc,
               bool first) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int32_t* wp = p.weights;
  for (int64_t s = 0; s < n_seg; ++s) {
    __m256i a[MR][2];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v)
        a[r][v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.corrections + s * kNr + v * kLanes));
    for (int64_t j = 0; j < seg_steps; j += 4, wp += 4 * kNr, x += 4 * kStep) {
      for (int r = 0; r < MR; ++r) {
        const __m256i u0 = broadcast4(x + r * ldx), u1 = broadcast4(x + r * ldx + 4);
        const __m256i u2 = broadcast4(x + r * ldx + 8), u3 = broadcast4(x + r * ldx + 12);
        for (int v = 0; v < 2; ++v) {
          const auto* wv = reinterpret_cast<const __m256i*>(wp + v * kLanes);
          __m256i t = _mm256_maddubs_epi16(u0, _mm256_loadu_si256(wv));
          t = _mm256_add_epi16(t, _mm256_maddubs_epi16(u1, _mm256_loadu_si256(wv + 2)));
          t = _mm256_add_epi16(t, _mm256_maddubs_epi16(u2, _mm256_loadu_si256(wv + 4)));
          t = _mm256_add_epi16(t, _mm256_maddubs_epi16(u3, _mm256_loadu_si256(wv + 6)));
          a[r][v] = _mm256_add_epi32(a[r][v], _mm256_madd_epi16(t, ones16));
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v) {
        float* out = acc + r * kNr + v * kLanes;
        const __m256 prior = first && s == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
        _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][v]), _mm256_loadu_ps(p.scales + s * kNr + v * kLanes), prior));
      }
  }
}

// The same for int8 with signed staged activations and the sign trick (see the top of the file).
// Overflow: |sum| <= 512 * 128 * 127 per block segment.
template <int MR>
void tile_int8(const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg, int64_t seg_steps, float* acc,
               bool first) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int32_t* wp = p.weights;
  for (int64_t s = 0; s < n_seg; ++s) {
    __m256i a[MR][2];
    for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    for (int64_t j = 0; j < seg_steps; ++j, wp += kNr, x += kStep) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + kLanes));
      const __m256i abs0 = _mm256_abs_epi8(w0), abs1 = _mm256_abs_epi8(w1);
      for (int r = 0; r < MR; ++r) {
        const __m256i xr = broadcast4(x + r * ldx);
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(abs0, _mm256_sign_epi8(xr, w0)), ones16));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(abs1, _mm256_sign_epi8(xr, w1)), ones16));
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v) {
        float* out = acc + r * kNr + v * kLanes;
        const __m256 prior = first && s == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
        _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][v]), _mm256_loadu_ps(p.scales + s * kNr + v * kLanes), prior));
      }
  }
}

template <int MR>
void tile(int bits, const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg, int64_t seg_steps, float* acc,
          bool first) {
  if (bits == 4) return tile_int4<MR>(x, ldx, p, n_seg, seg_steps, acc, first);
  tile_int8<MR>(x, ldx, p, n_seg, seg_steps, acc, first);
}

void tile_rows(int64_t rows, int bits, const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg,
               int64_t seg_steps, float* acc, bool first) {
  switch (rows) {
    case 1: return tile<1>(bits, x, ldx, p, n_seg, seg_steps, acc, first);
    case 2: return tile<2>(bits, x, ldx, p, n_seg, seg_steps, acc, first);
    case 3: return tile<3>(bits, x, ldx, p, n_seg, seg_steps, acc, first);
    default: return tile<kMr>(bits, x, ldx, p, n_seg, seg_steps, acc, first);
  }
}

// y[r][n0 + j] = acc[r][j] * x_scale[r] + bias, or NaN where the row's scale is not finite.
void write_rows(const float* acc, int64_t rows, const float* x_scale, const float* bias, int64_t n0, int64_t ncols,
                float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = x_scale[r];
    const bool finite = std::isfinite(s);
    float* out = y + r * ldy + n0;
    for (int64_t j = 0; j < ncols; ++j)
      out[j] = finite ? acc[r * kNr + j] * s + (bias ? bias[n0 + j] : 0.0f) : std::numeric_limits<float>::quiet_NaN();
  }
}

}  // namespace

void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, [[maybe_unused]] bool stream) {
  if (m <= 0 || n_begin >= n_end) return;
  const a8::Plan plan(w, a8::kKAlign);
  thread_local a8::Scratch<uint8_t> staged_buf;
  thread_local a8::Scratch<int32_t> panel_buf;
  thread_local a8::Scratch<float> scale_buf, acc_buf;
  const int64_t chunk = std::min(m, kMChunk);
  uint8_t* staged = staged_buf.get(chunk * plan.row_stride);
  int32_t* panel = panel_buf.get((kKBlock / kStep + kMaxSegments) * kNr);
  const PanelBlock block{panel, panel + kKBlock / kStep * kNr, scale_buf.get(kMaxSegments * kNr)};
  float* acc = acc_buf.get(chunk * kNr);

  for (int64_t m0 = 0; m0 < m; m0 += chunk) {
    const int64_t rows = std::min(chunk, m - m0);
    stage_activations(xq + m0 * w.k_pad, rows, w.k_pad, plan.k_round, plan.row_stride, w.bits == 4, staged);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
      const int64_t ncols = std::min<int64_t>(kNr, n_end - n0);
      for (int64_t b = 0; b < plan.n_blocks(); ++b) {
        pack_block(w, plan, b, n0, ncols, block);
        const int64_t n_seg = plan.n_segments(b), seg_steps = plan.segment_len(b) / kStep;
        for (int64_t r0 = 0; r0 < rows; r0 += kMr)
          tile_rows(std::min<int64_t>(kMr, rows - r0), w.bits, staged + r0 * plan.row_stride + plan.block_begin(b),
                    plan.row_stride, block, n_seg, seg_steps, acc + r0 * kNr, b == 0);
      }
      write_rows(acc, rows, x_scale + m0, bias, n0, ncols, y + m0 * w.n, w.n);
    }
  }
}

// Bit-identical to ref::quantize_activation_row (see the AVX-512 version): exact absmax, the same float32
// division, conversion in the current (nearest-even) rounding mode; NaN/Inf rows take the reference.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    int8_t* out = xq + r * k_pad;
    auto load = [&](int64_t i) {  // 8 floats from i, zero past k
      if (k - i >= kLanes) return _mm256_loadu_ps(xr + i);
      return _mm256_maskload_ps(xr + i, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k - i)), lanes));
    };
    __m256 absmax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += kLanes) {
      const __m256 v = load(i);
      absmax = _mm256_max_ps(absmax, _mm256_and_ps(v, abs_mask));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lane_max[kLanes];
    _mm256_store_ps(lane_max, absmax);
    float amax = 0.0f;
    for (float v : lane_max) amax = std::max(amax, v);
    if (_mm256_movemask_ps(nan) != 0 || !std::isfinite(amax)) {
      x_scale[r] = ref::quantize_activation_row(xr, k, k_pad, out);
      continue;
    }
    const float scale = amax / static_cast<float>(kActInt8QMax);
    x_scale[r] = scale;
    int64_t i = 0;
    if (scale > 0) {
      const __m256 s = _mm256_set1_ps(scale);
      // int32 -> int8: two saturating packs (exact: |q| <= 127), then the low 4 bytes of each 128-bit half.
      const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
      for (; i < k; i += kLanes) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(load(i), s));
        const __m256i q16 = _mm256_packs_epi32(q, q);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16), gather);
        const int64_t take = std::min<int64_t>(kLanes, k - i);
        if (take == kLanes) {
          _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(q8));
        } else {
          alignas(16) int8_t bytes[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm256_castsi256_si128(q8));
          std::memcpy(out + i, bytes, take);
        }
      }
      i = k;
    }
    std::memset(out + i, 0, k_pad - i);
  }
}

}  // namespace qk::avx2
