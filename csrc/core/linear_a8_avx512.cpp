// AVX-512 VNNI kernels for dynamic int8 activations: linear_a8 (vpdpbusd over weight panels packed per call)
// and quantize_rows. The scheme and the blocking are described in linear_a8_plan.h.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "linear_a8.h"
#include "linear_a8_plan.h"
#include "reference.h"

// After every #include, so that only this file's own functions are compiled for AVX-512.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma")
// GCC 12 warns inside its own intrinsics (the deliberately undefined pass-through operand, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "simd_avx512.h"

namespace qk::avx512 {
namespace {

using a8::kKBlock;
using a8::kMChunk;
using a8::kStep;
using simd512::load_bytes;
using simd512::transpose16x16;

// int32 lanes per zmm; a panel is two zmm of columns wide.
constexpr int kLanes = 16;
constexpr int kNr = 2 * kLanes;
// Rows per microkernel tile: 6 rows x 2 zmm = 12 int32 accumulators + 12 float accumulators + 2 weight vectors
// + 1 broadcast = 27 of the 32 zmm. The 12 independent vpdpbusd chains hide its 5-cycle latency.
constexpr int kMr = 6;
// Segments per block at most: a 512-element block of 32-element groups.
constexpr int64_t kMaxSegments = kKBlock / 32;

// acc += per 32-bit lane, the sum of 4 products u8(u) * s8(w). Inline asm ties the accumulator to one register:
// with the intrinsic, GCC 12 copies every accumulator twice per use (two register moves per vpdpbusd in the
// microkernel's loop).
inline void dpbusd(__m512i& acc, __m512i u, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(w));
}

// Stages `rows` rows of xq (k_pad columns) as u = xq + 128 in rows of k_round bytes, `stride` apart; padding
// gets u = 128 (xq = 0). int4 rows are de-interleaved within every 8 elements to meet the nibble order of the panels.
void stage_activations(const int8_t* xq, int64_t rows, int64_t k_pad, int64_t k_round, int64_t stride, bool int4,
                       uint8_t* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i deinterleave =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < k_round; i += 64) {
      __m512i v = _mm512_xor_si512(load_bytes(xq + r * k_pad + i, k_pad - i), flip);
      if (int4) v = _mm512_shuffle_epi8(v, deinterleave);
      const int64_t room = k_round - i;  // a multiple of 16
      const __mmask64 keep = room >= 64 ? ~__mmask64{0} : (__mmask64{1} << room) - 1;
      _mm512_mask_storeu_epi8(out + r * stride + i, keep, v);
    }
  }
}

// One K block of a panel of kNr columns: weights [steps][kNr] int32 lanes; per segment, kNr corrections
// (-128 * sum of the segment's weights, the start value of the integer accumulators) and kNr scales.
struct PanelBlock {
  int32_t* weights;
  int32_t* corrections;
  float* scales;
};

// Loads 64 bytes at `offset` of each of 16 rows `row_bytes` apart, of which `valid` exist and `avail` bytes
// may be read; zero beyond.
inline void load_rows(const uint8_t* first, int64_t row_bytes, int64_t valid, int64_t avail, __m512i rows[16]) {
  if (valid == kLanes && avail >= 64) {
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) rows[i] = _mm512_loadu_si512(first + i * row_bytes);
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i)
    rows[i] = i < valid ? load_bytes(first + i * row_bytes, avail) : _mm512_setzero_si512();
}

// Writes one step of 16 weight lanes to the panel and adds it to its segment's sum; at the end of a segment,
// stores the segment's correction -128 * sum (vpdpbusd with all-ones bytes sums each lane's 4 weights).
struct StepWriter {
  int32_t* weights;      // step 0, this half's first column
  int32_t* corrections;  // segment 0, this half's first column
  int64_t seg_steps;
  int64_t step = 0, seg_left = 0;
  __m512i sum = _mm512_setzero_si512();

  void operator()(__m512i w) {
    _mm512_storeu_si512(weights + step * kNr, w);
    sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), w);
    ++step;
    if (--seg_left == 0) {
      _mm512_storeu_si512(corrections + (step / seg_steps - 1) * kNr,
                          _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
      sum = _mm512_setzero_si512();
      seg_left = seg_steps;
    }
  }
};

// Packs block b of output columns [n0, n0 + ncols), ncols <= kNr; missing columns get zero weights and scales.
// Weights are transposed 16 rows x 16 lanes at a time: per 64 stored bytes of 16 rows, 64 shuffles.
void pack_block(const WeightView& w, const a8::Plan& plan, int64_t b, int64_t n0, int64_t ncols, PanelBlock p) {
  const int64_t begin = plan.block_begin(b), len = plan.block_len(b), steps = len / kStep;
  const int64_t seg_len = plan.segment_len(b), n_seg = plan.n_segments(b), row_bytes = w.row_bytes();
  const int64_t n_groups = w.n_groups();
  const auto* qdata = static_cast<const uint8_t*>(w.qdata);
  const __m512i scale_index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(n_groups)));
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t c0 = half * kLanes, n = n0 + c0;
    const int64_t valid = std::clamp<int64_t>(ncols - c0, 0, kLanes);
    const __mmask16 valid_mask = static_cast<__mmask16>((1u << valid) - 1);
    __m512i zero[kMaxSegments];  // per segment: each column's zero point in all 4 bytes of its lane
    for (int64_t s = 0; s < n_seg; ++s) {
      const int64_t g = plan.group_of(b, s);
      const __m512 scale =
          valid == 0 ? _mm512_setzero_ps()
                     : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid_mask, scale_index,
                                                w.scale + n * n_groups + g, sizeof(float));
      _mm512_storeu_ps(p.scales + s * kNr + c0, scale);
      if (w.zero_point != nullptr) {
        alignas(64) int32_t zero4[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) zero4[i] = i < valid ? w.zero_point[(n + i) * n_groups + g] * 0x01010101 : 0;
        zero[s] = _mm512_load_si512(zero4);
      } else {
        zero[s] = _mm512_set1_epi8(static_cast<char>(w.zero(0, 0)));
      }
    }
    StepWriter emit{p.weights + c0, p.corrections + c0, seg_len / kStep};
    emit.seg_left = emit.seg_steps;
    __m512i rows[kLanes];
    if (w.bits == 8) {
      for (int64_t e = 0; e < len; e += 64) {  // 64 elements of each row: 16 steps
        load_rows(qdata + n * row_bytes + begin + e, row_bytes, valid, w.k_pad - begin - e, rows);
        transpose16x16(rows);
        for (int64_t j = 0; j < 16 && emit.step < steps; ++j) emit(rows[j]);
      }
    } else {
      const __m512i low = _mm512_set1_epi8(0x0F);
      for (int64_t e = 0; e < len; e += 128) {  // 64 bytes of each row: 128 elements, 32 steps
        const int64_t byte = (begin + e) / 2;
        load_rows(qdata + n * row_bytes + byte, row_bytes, valid, row_bytes - byte, rows);
        transpose16x16(rows);
        // rows[d] lane i: stored bytes 4d..4d+3 of column i, elements e + 8d .. e + 8d + 7.
        for (int64_t d = 0; d < 16 && emit.step < steps; ++d) {
          const __m512i z = zero[(e + 8 * d) / seg_len];
          emit(_mm512_sub_epi8(_mm512_and_si512(rows[d], low), z));
          emit(_mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(rows[d], 4), low), z));
        }
      }
    }
  }
}

// acc[MR][kNr] (+)= sum over the block's segments of scale * (correction + sum_k w * u). x points at the
// block's first staged byte of the first row; rows are ldx bytes apart.
// Overflow: a lane adds at most 4 * 255 * 128 = 130560 per step, over a segment of <= 512 elements (128 steps)
// at most 16.7M, plus a correction of at most 128 * 128 * 512 = 8.4M: far inside int32.
template <int MR>
void tile(const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg, int64_t seg_steps, float* acc,
          bool first) {
  __m512 f[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v)
      f[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * kNr + v * kLanes);
  const int32_t* wp = p.weights;
  for (int64_t s = 0; s < n_seg; ++s) {
    __m512i a[MR][2];
    const __m512i c0 = _mm512_loadu_si512(p.corrections + s * kNr);
    const __m512i c1 = _mm512_loadu_si512(p.corrections + s * kNr + kLanes);
    for (int r = 0; r < MR; ++r) {
      a[r][0] = c0;
      a[r][1] = c1;
    }
    for (int64_t j = 0; j < seg_steps; ++j, wp += kNr, x += kStep) {
      const __m512i w0 = _mm512_loadu_si512(wp);
      const __m512i w1 = _mm512_loadu_si512(wp + kLanes);
      for (int r = 0; r < MR; ++r) {
        int32_t u4;
        std::memcpy(&u4, x + r * ldx, sizeof(u4));
        const __m512i u = _mm512_set1_epi32(u4);
        dpbusd(a[r][0], u, w0);
        dpbusd(a[r][1], u, w1);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(p.scales + s * kNr);
    const __m512 s1 = _mm512_loadu_ps(p.scales + s * kNr + kLanes);
    for (int r = 0; r < MR; ++r) {
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][0]), s0, f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][1]), s1, f[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) _mm512_storeu_ps(acc + r * kNr + v * kLanes, f[r][v]);
}

void tile_rows(int64_t rows, const uint8_t* x, int64_t ldx, const PanelBlock& p, int64_t n_seg, int64_t seg_steps,
               float* acc, bool first) {
  switch (rows) {
    case 1: return tile<1>(x, ldx, p, n_seg, seg_steps, acc, first);
    case 2: return tile<2>(x, ldx, p, n_seg, seg_steps, acc, first);
    case 3: return tile<3>(x, ldx, p, n_seg, seg_steps, acc, first);
    case 4: return tile<4>(x, ldx, p, n_seg, seg_steps, acc, first);
    case 5: return tile<5>(x, ldx, p, n_seg, seg_steps, acc, first);
    default: return tile<kMr>(x, ldx, p, n_seg, seg_steps, acc, first);
  }
}

// y[r][n0 + j] = acc[r][j] * x_scale[r] + bias, or NaN where the row's scale is not finite.
void write_rows(const float* acc, int64_t rows, const float* x_scale, const float* bias, int64_t n0, int64_t ncols,
                float* y, int64_t ldy, bool stream) {
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t valid = std::clamp<int64_t>(ncols - half * kLanes, 0, kLanes);
    if (valid == 0) break;
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
    const int64_t col = n0 + half * kLanes;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + col) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const float s = x_scale[r];
      const __m512 out = std::isfinite(s)
                             ? _mm512_fmadd_ps(_mm512_loadu_ps(acc + r * kNr + half * kLanes), _mm512_set1_ps(s), b)
                             : _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
      simd512::store_lanes(y + r * ldy + col, out, valid, stream);
    }
  }
}

}  // namespace

void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, bool stream) {
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
        for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
          tile_rows(std::min<int64_t>(kMr, rows - r0), staged + r0 * plan.row_stride + plan.block_begin(b),
                    plan.row_stride, block, n_seg, seg_steps, acc + r0 * kNr, b == 0);
        }
      }
      write_rows(acc, rows, x_scale + m0, bias, n0, ncols, y + m0 * w.n, w.n, stream);
    }
  }
  if (stream) _mm_sfence();  // streamed stores are weakly ordered: visible before whoever reads y next
}

namespace {

// The planar product's tile: kPlanarMr output channels x 32 pixels (two vectors), 16 accumulators.
constexpr int kPlanarMr = 8;

// sums[r * ld_sums + 16h + i] = corrections[r] + sum over the quads of K of u * w for channel r of the block at
// `a` and pixel 16h + i (h < NV, i < 16) from `b` (quads x_step bytes apart), u = code + 128. NV = 1 for a last
// block of at most 16 pixels. Not inlined: inlined into planar_a8, GCC 12 kept the accumulators on the stack (a
// load and a store per vpdpbusd, 2x the time). Overflow: after any prefix of K an accumulator holds sum_prefix
// code * w - 128 * sum_rest w, at most 128 * 128 * K in magnitude = 2^30 for the largest planar K (65536).
template <int NV>
__attribute__((noinline)) void planar_tile(const int8_t* a, int64_t ld_w, const int8_t* b, int64_t x_step,
                                          int64_t quads, const int32_t* corrections, int32_t* sums,
                                          int64_t ld_sums) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[kPlanarMr][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kPlanarMr; ++r)
    for (int h = 0; h < NV; ++h) acc[r][h] = _mm512_set1_epi32(corrections[r]);
  for (int64_t q = 0; q < quads; ++q, b += x_step) {
    __m512i u[NV];
    for (int h = 0; h < NV; ++h) u[h] = _mm512_xor_si512(_mm512_loadu_si512(b + 64 * h), flip);
#pragma GCC unroll 8
    for (int r = 0; r < kPlanarMr; ++r) {
      int32_t w4;
      std::memcpy(&w4, a + r * ld_w + 4 * q, sizeof(w4));
      const __m512i wb = _mm512_set1_epi32(w4);
      for (int h = 0; h < NV; ++h) dpbusd(acc[r][h], u[h], wb);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kPlanarMr; ++r)
    for (int h = 0; h < NV; ++h) _mm512_store_si512(sums + r * ld_sums + kLanes * h, acc[r][h]);
}

}  // namespace

int64_t planar_corrections_len(int64_t n) { return a8::round_up(n, kPlanarMr); }

void planar_corrections(const int8_t* rows, int64_t ld_w, int64_t n_begin, int64_t n_end, int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t e = 0; e < ld_w; e += 64)
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(rows + n * ld_w + e));
    out[n] = -128 * _mm512_reduce_add_epi32(sum);
  }
}

// The activations' words are the vector operand: flipped to u = code + 128 as they are loaded, each against a
// broadcast step of one weight row, so C comes out as output channels x pixels, plane rows of the NCHW output.
// A channel block's sums are kept for the whole chunk, then each piece's rows stored whole: output planes rarely
// start on a cache line (196 pixels: one in four), and only a row's aligned middle can go around the caches.
void planar_a8(const int8_t* rows, int64_t ld_w, const WeightView& w, const int32_t* corrections, const int8_t* x,
               int64_t ld_x, const PlanarPiece* pieces, int64_t count, const float* bias, int64_t ld_out,
               bool stream, bool pixel_rows) {
  if (count <= 0) return;
  const int64_t p_begin = pieces[0].begin, p_end = pieces[count - 1].end;
  const int64_t quads = ld_w / 4, x_step = ld_x * 4;  // bytes from one quad of K to the next
  const int64_t ld_sums = a8::round_up(p_end - p_begin, 2 * kLanes);
  thread_local a8::Scratch<int32_t> sums_buf;
  int32_t* const buffers = sums_buf.get(2 * kPlanarMr * ld_sums);
  // Rows [r0, r1) of block n0 from its sums, each piece's run stored whole.
  auto store_rows = [&](const int32_t* sums, int64_t n0, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = n0 + r;
      const __m512 ws = _mm512_set1_ps(w.scale[n]), bn = _mm512_set1_ps(bias ? bias[n] : 0.0f);
      for (const PlanarPiece* piece = pieces; piece < pieces + count; ++piece) {
        const __m512 xs = _mm512_set1_ps(piece->x_scale);
        const bool finite = std::isfinite(piece->x_scale);
        const int32_t* src = sums + r * ld_sums + (piece->begin - p_begin);
        float* dst = piece->out + n * ld_out;
        const int64_t len = piece->end - piece->begin;
        // Up to the first cache line boundary (floats are 4-byte aligned), then whole vectors.
        int64_t c = stream ? std::min<int64_t>(len, (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) % 64 / 4) : 0;
        if (c > 0) simd512::store_planar(src, ws, xs, finite, bn, dst, c, false);
        for (; c < len; c += kLanes)
          simd512::store_planar(src + c, ws, xs, finite, bn, dst + c, std::min<int64_t>(kLanes, len - c), stream);
      }
    }
  };
  // Pixel rows: 16 columns [c, c + 16) of block n0 at a time (fewer past the last piece), its rows transposed into
  // each pixel's run of output channels, scaled as store_planar scales them.
  const int64_t columns = p_end - p_begin;
  auto store_columns = [&](const int32_t* sums, int64_t n0, int64_t v0, int64_t v1) {
    const int64_t rows_here = std::min<int64_t>(kPlanarMr, w.n - n0);
    const __mmask8 keep = static_cast<__mmask8>((1u << rows_here) - 1);
    const __m256 bn = bias ? _mm256_maskz_loadu_ps(keep, bias + n0) : _mm256_setzero_ps();
    __m512 ws[kPlanarMr];
    for (int r = 0; r < kPlanarMr; ++r) ws[r] = _mm512_set1_ps(r < rows_here ? w.scale[n0 + r] : 0.0f);
    const PlanarPiece* piece = pieces;
    for (int64_t c = v0 * kLanes; c < std::min(columns, v1 * kLanes); c += kLanes) {
      __m512 v[kPlanarMr];
      for (int r = 0; r < kPlanarMr; ++r)
        v[r] = r < rows_here ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums + r * ld_sums + c)), ws[r])
                             : _mm512_setzero_ps();
      // 8 x 16 -> 16 x 8: within each 128-bit lane L, u[j] holds rows 0-3 and u[4 + j] rows 4-7 of pixel 4L + j.
      __m512 u[kPlanarMr];
      for (int h = 0; h < 2; ++h) {
        const __m512 lo01 = _mm512_unpacklo_ps(v[4 * h], v[4 * h + 1]);
        const __m512 hi01 = _mm512_unpackhi_ps(v[4 * h], v[4 * h + 1]);
        const __m512 lo23 = _mm512_unpacklo_ps(v[4 * h + 2], v[4 * h + 3]);
        const __m512 hi23 = _mm512_unpackhi_ps(v[4 * h + 2], v[4 * h + 3]);
        u[4 * h] = _mm512_shuffle_ps(lo01, lo23, 0x44);
        u[4 * h + 1] = _mm512_shuffle_ps(lo01, lo23, 0xEE);
        u[4 * h + 2] = _mm512_shuffle_ps(hi01, hi23, 0x44);
        u[4 * h + 3] = _mm512_shuffle_ps(hi01, hi23, 0xEE);
      }
      const __m512i lanes01 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i lanes23 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      __m256 pixel[kLanes];
      for (int j = 0; j < 4; ++j) {
        const __m512 a = _mm512_permutex2var_ps(u[j], lanes01, u[4 + j]);  // pixels j, 4 + j
        const __m512 b = _mm512_permutex2var_ps(u[j], lanes23, u[4 + j]);  // pixels 8 + j, 12 + j
        pixel[j] = _mm512_castps512_ps256(a);
        pixel[4 + j] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
        pixel[8 + j] = _mm512_castps512_ps256(b);
        pixel[12 + j] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1));
      }
      for (int64_t i = 0; i < std::min<int64_t>(kLanes, columns - c); ++i) {
        const int64_t col = p_begin + c + i;
        while (col >= piece->end) ++piece;
        const __m256 y = std::isfinite(piece->x_scale)
                             ? _mm256_fmadd_ps(pixel[i], _mm256_set1_ps(piece->x_scale), bn)
                             : _mm256_set1_ps(__builtin_nanf(""));
        _mm256_mask_storeu_ps(piece->out + (col - piece->begin) * ld_out + n0, keep, y);
      }
    }
  };
  auto sums_of = [&](int64_t n0) { return buffers + n0 / kPlanarMr % 2 * kPlanarMr * ld_sums; };
  auto rows_of = [&](int64_t n0) { return std::min<int64_t>(kPlanarMr, w.n - n0); };
  // Two blocks' sums: a block's rows are stored a few at a time between the next block's tiles, so that the
  // stores drain while the tiles compute (stored in one burst after the block's own tiles, ResNet-50 stage3 1x1
  // expand took 1.15x the time).
  const int64_t tiles = (p_end - p_begin + 2 * kLanes - 1) / (2 * kLanes);
  const int64_t vectors = (columns + kLanes - 1) / kLanes;
  int64_t held = -1;
  // Channel blocks outside, as in amx::planar_a8 (pixel blocks outside measured 1-3 % slower on Zen 4).
  for (int64_t n0 = 0; n0 < w.n; n0 += kPlanarMr) {
    // What of the held block is stored between this block's tiles: its rows, or its pixel vectors.
    const int64_t held_units = held < 0 ? 0 : pixel_rows ? vectors : rows_of(held);
    int64_t stored = 0, t = 0;
    // The next block's weight rows are fetched into L2 a slice before each of this block's tiles: with a short K
    // the tiles are too short for the hardware's prefetch to bring a block from memory in time (ResNet-50 stage4
    // 1x1 expand, K = 512, weights read from memory: 1.04-1.13x faster; the other layers 0.98-1.05x, in the noise).
    const char* const next_rows = reinterpret_cast<const char*>(rows + (n0 + kPlanarMr) * ld_w);
    const int64_t next_bytes = n0 + kPlanarMr < w.n ? rows_of(n0 + kPlanarMr) * ld_w : 0;
    int64_t fetched = 0;
    for (int64_t p0 = p_begin; p0 < p_end; p0 += 2 * kLanes) {
      for (const int64_t upto = next_bytes * (t + 1) / tiles; fetched < upto; fetched += 64)
        _mm_prefetch(next_rows + fetched, _MM_HINT_T1);
      int32_t* const tile_sums = sums_of(n0) + (p0 - p_begin);
      if (p_end - p0 > kLanes)
        planar_tile<2>(rows + n0 * ld_w, ld_w, x + p0 * 4, x_step, quads, corrections + n0, tile_sums, ld_sums);
      else
        planar_tile<1>(rows + n0 * ld_w, ld_w, x + p0 * 4, x_step, quads, corrections + n0, tile_sums, ld_sums);
      const int64_t upto = held_units * ++t / tiles;
      if (upto > stored && pixel_rows)
        store_columns(sums_of(held), held, stored, upto);
      else if (upto > stored)
        store_rows(sums_of(held), held, stored, upto);
      stored = upto;
    }
    held = n0;
  }
  if (pixel_rows) {
    store_columns(sums_of(held), held, 0, vectors);
    return;
  }
  store_rows(sums_of(held), held, 0, rows_of(held));
  if (stream) _mm_sfence();
}

// Bit-identical to ref::quantize_activation_row: the absmax is exact in any order, the division is the same
// float32 division and the conversion rounds in the current (nearest-even) mode like nearbyint. Rows with NaN or
// Inf take the reference itself, so no non-finite value is ever converted to an integer.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    int8_t* out = xq + r * k_pad;
    __m512 absmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < k; i += kLanes) {
      const __mmask16 keep = k - i >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(keep, xr + i);
      absmax = _mm512_max_ps(absmax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = _mm512_reduce_max_ps(absmax);
    if (nan || !std::isfinite(amax)) {
      x_scale[r] = ref::quantize_activation_row(xr, k, k_pad, out);
      continue;
    }
    const float scale = amax / static_cast<float>(kActInt8QMax);
    x_scale[r] = scale;
    int64_t i = 0;
    if (scale > 0) {
      const __m512 s = _mm512_set1_ps(scale);
      for (; i < k; i += kLanes) {
        const __mmask16 keep = k - i >= kLanes ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1);
        const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(keep, xr + i), s));
        _mm_mask_storeu_epi8(out + i, keep, _mm512_cvtsepi32_epi8(q));
      }
      i = k;
    }
    std::memset(out + i, 0, k_pad - i);
  }
}

}  // namespace qk::avx512
