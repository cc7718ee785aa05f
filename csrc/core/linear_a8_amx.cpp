// AMX-INT8 kernel for dynamic int8 activations (the linear_a8 slot of the amx table).
//
// Computed transposed, C^T[n][m] = sum_k W[n][k] * xq[m][k], so that weight rows are never transposed: an A tile
// is 16 weight rows x 64 bytes of K as stored (int8, copied per block into an L1 buffer) or decoded from nibbles
// (int4); a B tile is 16 quads of K x 16 activation rows, the "VNNI" layout, built once per call from xq (M x K
// bytes, not N x K). tdpbssd multiplies signed by signed bytes, so int4 weights enter as code - zero (-15..15)
// and no correction term is needed. One tdpbssd is 16 x 16 x 64 multiply-adds (1024 per cycle, 8 vpdpbusd).
//
// Per call (one thread's N range): stage the B layout of an M chunk; then per 32 output columns (two A tiles)
// and K block (512 elements, the block's decoded weights reused from L1 by every row pass), per 32 activation
// rows (two B tiles): four C tiles accumulate one segment (a group, or the block for per-channel weights) and
// are scaled into float accumulators [32 n][M], transposed into y once the columns are done.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "linear_a8.h"
#include "linear_a8_plan.h"

// After every #include, so that only this file's own functions are compiled for AVX-512 and AMX.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")
// GCC 12 warns inside its own intrinsics (the deliberately undefined pass-through operand, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "simd_avx512.h"

namespace qk::amx {
namespace {

using a8::kKBlock;
using a8::kMChunk;
using simd512::load_bytes;
using simd512::transpose16x16;

constexpr int kTile = 16;       // rows of A, B and C tiles; int32 lanes of a C row
constexpr int kTileBytes = 64;  // bytes of a tile row
constexpr int kNr = 2 * kTile;  // output columns per pass: two A tiles
constexpr int kMr = 2 * kTile;  // activation rows per pass: two B tiles
constexpr int64_t kMaxSegments = kKBlock / 32;

// Tile registers (the tile intrinsics take literal numbers): C[a][b] = tmm(2a + b) for A tile a (columns) and
// B tile b (rows); A[a] = tmm(4 + a); B[b] = tmm(6 + b).

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// K elements per tdpbssd: 64 (a full A row), or 32 for 32-element groups so that a step never spans two groups.
int64_t k_step(const WeightView& w) { return w.group_len == 32 ? 32 : 64; }

TileConfig tile_config(int64_t kk) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {
    c.rows[t] = kTile;
    c.colsb[t] = kTileBytes;
  }
  for (int t = 4; t < 6; ++t) {
    c.rows[t] = kTile;
    c.colsb[t] = static_cast<uint16_t>(kk);
  }
  for (int t = 6; t < 8; ++t) {
    c.rows[t] = static_cast<uint8_t>(kk / 4);
    c.colsb[t] = kTileBytes;
  }
  return c;
}

// Within every 16 elements, the decoded int4 weights hold the 8 low nibbles (elements 0, 2, .., 14) first, then
// the 8 high nibbles; activations are staged in the same order.
const __m128i kInt4Order = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);

// Stages `rows` rows of xq (k_pad columns) in the B layout: for each quad q of K and each row m < m_pad, the 4
// bytes xq[m][4q..4q+3] at out + (q * m_pad + m) * 4. Rows past `rows` and columns past k_pad are zero.
void stage_activations(const int8_t* xq, int64_t rows, int64_t m_pad, int64_t k_pad, int64_t k_round, bool int4,
                       int8_t* out) {
  const __m512i order = _mm512_broadcast_i32x4(kInt4Order);
  __m512i r[kTile];
  for (int64_t m0 = 0; m0 < m_pad; m0 += kTile) {
    for (int64_t e = 0; e < k_round; e += kTileBytes) {
      for (int64_t i = 0; i < kTile; ++i) {
        r[i] = m0 + i < rows ? load_bytes(xq + (m0 + i) * k_pad + e, k_pad - e) : _mm512_setzero_si512();
        if (int4) r[i] = _mm512_shuffle_epi8(r[i], order);
      }
      transpose16x16(r);
      for (int64_t j = 0; j < kTile && e / 4 + j < k_round / 4; ++j)
        _mm512_storeu_si512(out + ((e / 4 + j) * m_pad + m0) * 4, r[j]);
    }
  }
}

// Decodes the weights of block b, columns [n0, n0 + ncols), into out [kNr][kKBlock] as signed bytes:
// int8 copied, int4 as code - zero in kInt4Order; zero past ncols and past k_pad. Copying int8 rows too keeps the
// A tiles of a block in L1 for every row pass: read in place, the rows (k_pad bytes apart, often a multiple of
// 4 KiB) would all fall in one L1 set.
void decode_block(const WeightView& w, const a8::Plan& plan, int64_t b, int64_t n0, int64_t ncols, int8_t* out) {
  const int64_t begin = plan.block_begin(b), len = plan.block_len(b), row_bytes = w.row_bytes();
  const auto* qdata = static_cast<const uint8_t*>(w.qdata);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i first_half = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i second_half = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const int64_t last_group = w.n_groups() - 1;
  for (int64_t i = 0; i < kNr; ++i) {
    int8_t* row_out = out + i * kKBlock;
    if (i >= ncols) {
      std::memset(row_out, 0, len);
      continue;
    }
    const uint8_t* row = qdata + (n0 + i) * row_bytes;
    if (w.bits == 8) {
      for (int64_t e = 0; e < len; e += 64)
        _mm512_storeu_si512(row_out + e, load_bytes(row + begin + e, w.k_pad - begin - e));
      continue;
    }
    for (int64_t e = 0; e < len; e += 128) {  // 64 stored bytes: 128 elements
      const int64_t byte = (begin + e) / 2;
      const __m512i packed = load_bytes(row + byte, row_bytes - byte);
      const __m512i lo = _mm512_and_si512(packed, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      // Per 128-bit part L: unpacklo holds elements 32L..32L+15 in kInt4Order, unpackhi elements 32L+16..32L+31.
      const __m512i a = _mm512_unpacklo_epi64(lo, hi), c = _mm512_unpackhi_epi64(lo, hi);
      for (int64_t half = 0; half < 2 && e + 64 * half < len; ++half) {
        // Each 32 elements lie in one group (groups hold 32 or more); columns past k_pad take the last group's
        // zero point (whatever they decode to meets zero activations).
        const int64_t g0 = std::min(last_group, (begin + e + 64 * half) / w.group_len);
        const int64_t g1 = std::min(last_group, (begin + e + 64 * half + 32) / w.group_len);
        const __m512i zero = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8(static_cast<char>(w.zero(n0 + i, g0))),
                                                     _mm512_set1_epi8(static_cast<char>(w.zero(n0 + i, g1))));
        const __m512i codes = _mm512_permutex2var_epi64(a, half ? second_half : first_half, c);
        _mm512_storeu_si512(row_out + e + 64 * half, _mm512_sub_epi8(codes, zero));
      }
    }
  }
}

// Scales of block b's segments for columns [n0, n0 + ncols): scales[s * kNr + i], zero past ncols.
void block_scales(const WeightView& w, const a8::Plan& plan, int64_t b, int64_t n0, int64_t ncols, float* scales) {
  const int64_t n_groups = w.n_groups();
  const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(n_groups)));
  for (int64_t s = 0; s < plan.n_segments(b); ++s) {
    const int64_t g = plan.group_of(b, s);
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t valid = std::clamp<int64_t>(ncols - half * kTile, 0, kTile);
      const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
      const float* first = w.scale + (n0 + half * kTile) * n_groups + g;
      const __m512 v = valid == 0 ? _mm512_setzero_ps()
                                  : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, index, first, sizeof(float));
      _mm512_storeu_ps(scales + s * kNr + half * kTile, v);
    }
  }
}

// acc[i][m] (+)= scale[i] * C[i][m] for the four C tiles of one segment: i the column (0..31), m the row of the
// pass (0..31); acc rows are m_pad floats apart. Overflow of C: |sum| <= 512 * 128 * 128 per segment.
void add_segment(const float* scales, float* acc, int64_t m_pad, bool first) {
  alignas(64) int32_t c[4][kTile * kTile];
  _tile_stored(0, c[0], kTileBytes);
  _tile_stored(1, c[1], kTileBytes);
  _tile_stored(2, c[2], kTileBytes);
  _tile_stored(3, c[3], kTileBytes);
  for (int a = 0; a < 2; ++a)
    for (int i = 0; i < kTile; ++i) {
      const __m512 s = _mm512_set1_ps(scales[a * kTile + i]);
      for (int b = 0; b < 2; ++b) {
        float* out = acc + (a * kTile + i) * m_pad + b * kTile;
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(c[2 * a + b] + i * kTile));
        _mm512_storeu_ps(out, _mm512_fmadd_ps(sum, s, first ? _mm512_setzero_ps() : _mm512_loadu_ps(out)));
      }
    }
}

// y[m][n0 + j] = acc[j][m] * x_scale[m] + bias[n0 + j] for m < rows, j < ncols; NaN where x_scale[m] is not finite.
void write_rows(const float* acc, int64_t m_pad, int64_t rows, const float* x_scale, const float* bias, int64_t n0,
                int64_t ncols, float* y, int64_t ldy) {
  __m512i t[kTile];
  for (int64_t j0 = 0; j0 < ncols; j0 += kTile) {
    const int64_t cols = std::min<int64_t>(kTile, ncols - j0);
    const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + n0 + j0) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < rows; m0 += kTile) {
      for (int i = 0; i < kTile; ++i) t[i] = _mm512_loadu_si512(acc + (j0 + i) * m_pad + m0);
      transpose16x16(t);
      for (int64_t i = 0; i < kTile && m0 + i < rows; ++i) {
        const float s = x_scale[m0 + i];
        const __m512 out = std::isfinite(s) ? _mm512_fmadd_ps(_mm512_castsi512_ps(t[i]), _mm512_set1_ps(s), b)
                                            : _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + n0 + j0, keep, out);
      }
    }
  }
}

}  // namespace

void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end) {
  if (m <= 0 || n_begin >= n_end) return;
  if (!amx_usable()) return avx512::linear_a8(w, xq, x_scale, m, bias, y, n_begin, n_end);
  const int64_t kk = k_step(w);
  const a8::Plan plan(w, kk);
  thread_local a8::Scratch<int8_t> staged_buf, weight_buf;
  thread_local a8::Scratch<float> scale_buf, acc_buf;
  const int64_t chunk = std::min(m, kMChunk);
  const int64_t chunk_pad = a8::round_up(chunk, kMr);
  int8_t* staged = staged_buf.get(chunk_pad * plan.k_round);
  int8_t* decoded = weight_buf.get(kNr * kKBlock);
  float* scales = scale_buf.get(kMaxSegments * kNr);
  float* acc = acc_buf.get(kNr * chunk_pad);
  const TileConfig config = tile_config(kk);
  _tile_loadconfig(&config);

  for (int64_t m0 = 0; m0 < m; m0 += chunk) {
    const int64_t rows = std::min(chunk, m - m0), m_pad = a8::round_up(rows, kMr);
    stage_activations(xq + m0 * w.k_pad, rows, m_pad, w.k_pad, plan.k_round, w.bits == 4, staged);
    const int64_t b_stride = m_pad * 4;  // bytes from one quad of K to the next in the B layout
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
      const int64_t ncols = std::min<int64_t>(kNr, n_end - n0);
      for (int64_t b = 0; b < plan.n_blocks(); ++b) {
        decode_block(w, plan, b, n0, ncols, decoded);
        block_scales(w, plan, b, n0, ncols, scales);
        const int64_t seg_len = plan.segment_len(b);
        for (int64_t mp = 0; mp < m_pad; mp += kMr) {
          for (int64_t s = 0; s < plan.n_segments(b); ++s) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t e = s * seg_len; e < (s + 1) * seg_len; e += kk) {
              const int8_t* bp = staged + (plan.block_begin(b) + e) / 4 * b_stride + mp * 4;
              _tile_loadd(4, decoded + e, kKBlock);
              _tile_loadd(5, decoded + kTile * kKBlock + e, kKBlock);
              _tile_loadd(6, bp, b_stride);
              _tile_loadd(7, bp + kTile * 4, b_stride);
              _tile_dpbssd(0, 4, 6);
              _tile_dpbssd(1, 4, 7);
              _tile_dpbssd(2, 5, 6);
              _tile_dpbssd(3, 5, 7);
            }
            add_segment(scales + s * kNr, acc + mp, m_pad, b == 0 && s == 0);
          }
        }
      }
      write_rows(acc, m_pad, rows, x_scale + m0, bias, n0, ncols, y + m0 * w.n, w.n);
    }
  }
  _tile_release();
}

}  // namespace qk::amx
