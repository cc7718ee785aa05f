// AMX-INT8 kernel for dynamic int8 activations (the linear_a8 slot of the amx table).
//
// C[m][n] = sum_k xq[m][k] * W[n][k] on the tile unit. An A tile is 16 activation rows x 64 bytes of K, loaded
// from xq where it lies; a B tile is 16 quads of K x 16 weight columns in the "VNNI" layout, B[q][4c + j] =
// W[c][4q + j], packed per call from the stored rows (int4 decoded to code - zero, -15..15). tdpbssd multiplies
// signed by signed bytes, so no correction term is needed; one tdpbssd is 16 x 16 x 64 multiply-adds. C rows are
// output rows, so the epilogue scales and writes y row by row, with no transpose.
//
// Per call (one thread's N range), per block of up to 256 activation rows (kept in L2), per 32 output columns
// (two B tiles), per 32 activation rows (two A tiles): four C tiles run over K, one segment at a time. linear_a8
// packs the weights once per call: per 32 columns just before use where one row block covers M, else all of
// the range up front (N x K bytes), so that taller inputs do not pack them again for every row block. Callers
// that run one weight many times (conv) pack it once with pack_a8 and call linear_a8_packed.
// A segment shares one scale per column: a group, or for per-channel weights up to kMaxSegmentK of K, so that
// |sum| <= kMaxSegmentK * 127 * 127 stays inside int32. Segment sums are stored and read back one segment later
// (a tile store does not forward to vector loads: read at once, the loads wait for it to reach the cache), and
// scaled into float accumulators, or for a single segment straight into y.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "linear_a8.h"
#include "linear_a8_plan.h"
#include "linear_f32.h"

// After every #include, so that only this file's own functions are compiled for AVX-512 and AMX.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")
// GCC 12 warns inside its own intrinsics (the deliberately undefined pass-through operand, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "simd_avx512.h"

namespace qk::amx {
namespace {

using simd512::load_bytes;
using simd512::transpose16x16;

constexpr int kTile = 16;       // rows of A and C tiles; int32 lanes of a C row; weight columns of a B tile
constexpr int kTileBytes = 64;  // bytes of a tile row
constexpr int kNr = 2 * kTile;  // output columns per pass: two B tiles
static_assert(kNr == kPackedA8Columns, "a packed unit is one pass of columns");
constexpr int kMr = 2 * kTile;  // activation rows per pass: two A tiles
constexpr int64_t kMaxSegmentK = 65536;
constexpr int64_t kPackPrefetchSteps = 8;  // how far ahead packing prefetches each weight row, in K steps
constexpr int64_t kMBlock = 256;  // activation rows per row block: 256 x K = 1 MB of A at K = 4096

// Tile registers (the tile intrinsics take literal numbers): C[a][b] = tmm(2a + b) for A tile a (rows) and
// B tile b (columns); A[a] = tmm(4 + a); B[b] = tmm(6 + b).

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

// How K is cut: steps of kk elements (one tdpbssd), segments of whole steps sharing a scale per column.
struct Layout {
  int64_t kk = 64;
  int64_t steps = 0;         // k_pad rounded up to kk, in steps
  int64_t segment_steps = 0;
  int64_t n_groups = 1;
  bool per_channel = true;
  explicit Layout(const WeightView& w) : kk(k_step(w)), n_groups(w.n_groups()), per_channel(n_groups == 1) {
    steps = (w.k_pad + kk - 1) / kk;
    segment_steps = per_channel ? std::min(steps, kMaxSegmentK / kk) : w.group_len / kk;
  }
  int64_t segments() const { return (steps + segment_steps - 1) / segment_steps; }
  int64_t group_of(int64_t segment) const { return per_channel ? 0 : segment; }
  int64_t b_tile_bytes() const { return kk / 4 * kTileBytes; }
  // A packed pair of column tiles: the B tiles of each (steps tiles apiece), then the scales.
  int64_t column_tile_bytes() const { return steps * b_tile_bytes(); }
  int64_t scales_offset() const { return 2 * column_tile_bytes(); }
  int64_t pair_bytes() const { return scales_offset() + segments() * kNr * sizeof(float); }
};

// Elements [e, e + kk) of weight row n (its groups: `groups`) as signed bytes in element order: int8 as stored,
// int4 as code - zero; zero past k_pad.
inline __m512i weight_bytes(const WeightView& w, const Layout& lay, const RowGroups& groups, int64_t n, int64_t e) {
  const int64_t avail = std::min(lay.kk, w.k_pad - e);
  if (w.bits == 8) return load_bytes(static_cast<const int8_t*>(w.qdata) + n * w.k_pad + e, avail);
  const uint8_t* packed = static_cast<const uint8_t*>(w.qdata) + n * w.row_bytes() + e / 2;
  const __mmask32 byte_mask = static_cast<__mmask32>((uint64_t{1} << (avail / 2)) - 1);  // avail is even
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(byte_mask, packed));
  // Word j holds byte j; as two bytes it becomes (low nibble, high nibble): elements 2j and 2j + 1.
  const __m512i codes = _mm512_or_si512(_mm512_and_si512(words, _mm512_set1_epi16(0x000F)),
                                        _mm512_and_si512(_mm512_slli_epi16(words, 4), _mm512_set1_epi16(0x0F00)));
  const __mmask64 valid = avail >= 64 ? ~__mmask64{0} : (__mmask64{1} << avail) - 1;
  return _mm512_maskz_sub_epi8(valid, codes, _mm512_set1_epi8(static_cast<char>(groups.zero_of(e / w.group_len))));
}

// Packs weight columns [n0, n0 + ncols), ncols <= 32, into two column tiles of B tiles: tile (h, step) at
// out + (h * steps + step) * b_tile_bytes, 64-byte rows; then the scales of every segment, [segment][32] floats.
// Columns past ncols are zero.
void pack_columns(const WeightView& w, const Layout& lay, int64_t n0, int64_t ncols, int8_t* out) {
  RowGroups groups[kNr];
  for (int64_t col = 0; col < ncols; ++col) groups[col] = RowGroups(w, n0 + col);
  __m512i r[kTile];
  for (int h = 0; h < 2; ++h)
    for (int64_t step = 0; step < lay.steps; ++step) {
      for (int c = 0; c < kTile; ++c) {
        const int64_t col = h * kTile + c;
        if (col >= ncols) {
          r[c] = _mm512_setzero_si512();
          continue;
        }
        // The rows are read side by side, 16 streams of 32 or 64 bytes a step: without asking ahead, each step
        // waited for its lines from memory (measured: packing took a third of a w4a8 call at M = 128).
        _mm_prefetch(static_cast<const char*>(w.qdata) + (n0 + col) * w.row_bytes() +
                         (step + kPackPrefetchSteps) * lay.kk * w.bits / 8, _MM_HINT_T0);
        r[c] = weight_bytes(w, lay, groups[col], n0 + col, step * lay.kk);
      }
      transpose16x16(r);  // r[q] lane c: quad q of column c
      int8_t* tile = out + h * lay.column_tile_bytes() + step * lay.b_tile_bytes();
      for (int64_t q = 0; q < lay.kk / 4; ++q) _mm512_store_si512(tile + q * kTileBytes, r[q]);
    }
  float* scales = reinterpret_cast<float*>(out + lay.scales_offset());
  for (int64_t s = 0; s < lay.segments(); ++s)
    for (int64_t col = 0; col < kNr; ++col)
      scales[s * kNr + col] = col < ncols ? groups[col].scale[lay.group_of(s)] : 0.0f;
}

// The int32 sums of one pass's segment, waiting to be scaled: C tile t at c[t].
struct alignas(64) SegmentSums {
  int32_t c[4][kTile * kTile];
};

inline void zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// C[i][j] += A[i] B[j]: the A tiles are 16 rows at a and 16 rows further (lda apart), the B tiles at b0 and b1.
inline void multiply_add(const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t ldb) {
  _tile_loadd(4, a, lda);
  _tile_loadd(5, a + kTile * lda, lda);
  _tile_loadd(6, b0, ldb);
  _tile_loadd(7, b1, ldb);
  _tile_dpbssd(0, 4, 6);
  _tile_dpbssd(1, 4, 7);
  _tile_dpbssd(2, 5, 6);
  _tile_dpbssd(3, 5, 7);
}

inline void store_sums(SegmentSums& s) {
  _tile_stored(0, s.c[0], kTileBytes);
  _tile_stored(1, s.c[1], kTileBytes);
  _tile_stored(2, s.c[2], kTileBytes);
  _tile_stored(3, s.c[3], kTileBytes);
}

// A stored segment and where it goes.
struct Pending {
  const SegmentSums* sums = nullptr;
  const float* scales = nullptr;  // [32]: the segment's scale per column
  int64_t m0 = 0, rows = 0, n0 = 0, ncols = 0;
  bool first = false, last = false;
};

struct Epilogue {
  const WeightView& w;
  const Layout& lay;
  const float* x_scale;
  const float* bias;
  float* y;
  float* acc;  // [kMr][kNr]

  // acc (+)= sums * scales, and on the segment that ends the pass, y = acc * x_scale + bias (NaN for a row whose
  // x_scale is not finite).
  void finish(const Pending& p) const {
    __m512 scale[2], b[2];
    __mmask16 keep[2];
    for (int h = 0; h < 2; ++h) {
      scale[h] = _mm512_load_ps(p.scales + h * kTile);
      const int64_t valid = std::clamp<int64_t>(p.ncols - h * kTile, 0, kTile);
      keep[h] = static_cast<__mmask16>((1u << valid) - 1);
      b[h] = bias && valid > 0 ? _mm512_maskz_loadu_ps(keep[h], bias + p.n0 + h * kTile) : _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < p.rows; ++r) {
      const float s = x_scale[p.m0 + r];
      for (int h = 0; h < 2; ++h) {
        if (keep[h] == 0) continue;
        const int32_t* c = p.sums->c[2 * (r / kTile) + h] + (r % kTile) * kTile;
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c)), scale[h]);
        float* a = acc + r * kNr + h * kTile;
        if (!p.first) v = _mm512_add_ps(v, _mm512_load_ps(a));
        if (!p.last) {
          _mm512_store_ps(a, v);
          continue;
        }
        const __m512 out = std::isfinite(s) ? _mm512_fmadd_ps(v, _mm512_set1_ps(s), b[h])
                                            : _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
        _mm512_mask_storeu_ps(y + (p.m0 + r) * w.n + p.n0 + h * kTile, keep[h], out);
      }
    }
  }
};

// The product over columns [n_begin, n_end); pair(j) returns the packed bytes of pair j, the 32 columns from
// n_begin + 32 j, and is called again for every row block.
template <typename PairSource>
void run_tiles(const WeightView& w, const Layout& lay, const int8_t* xq, const float* x_scale, int64_t m,
               const float* bias, float* y, int64_t n_begin, int64_t n_end, const PairSource& pair) {
  const int64_t k_stage = lay.steps * lay.kk;  // K of a staged activation row
  thread_local a8::Scratch<int8_t> staged_buf;
  thread_local a8::Scratch<SegmentSums> sums_buf;
  thread_local a8::Scratch<float> acc_buf;
  const int64_t pairs = (n_end - n_begin + kNr - 1) / kNr;
  int8_t* staged = staged_buf.get(kMr * k_stage);
  SegmentSums* sums = sums_buf.get(2);
  float* acc = acc_buf.get(kMr * kNr);
  const Epilogue epilogue{w, lay, x_scale, bias, y, acc};
  // Activation rows are read in place by whole passes when K needs no padding; the last, partial pass (and
  // every pass otherwise) is copied into a zero-padded buffer, so that no tile load reads past xq.
  const bool in_place = k_stage == w.k_pad;
  const int64_t whole_passes = in_place ? m / kMr : 0;

  const TileConfig config = tile_config(lay.kk);
  _tile_loadconfig(&config);
  Pending pending;
  int slot = 0;
  for (int64_t mb = 0; mb < m; mb += kMBlock)
    for (int64_t j = 0; j < pairs; ++j) {
      const int64_t n0 = n_begin + j * kNr, ncols = std::min<int64_t>(kNr, n_end - n0);
      const int8_t* b0 = pair(j);
      const int8_t* b1 = b0 + lay.column_tile_bytes();
      const float* pair_scales = reinterpret_cast<const float*>(b0 + lay.scales_offset());
      for (int64_t m0 = mb; m0 < std::min(m, mb + kMBlock); m0 += kMr) {
        const int64_t rows = std::min<int64_t>(kMr, m - m0);
        const int8_t* a = xq + m0 * w.k_pad;
        int64_t lda = w.k_pad;
        if (m0 / kMr >= whole_passes) {
          for (int64_t r = 0; r < kMr; ++r) {
            int8_t* dst = staged + r * k_stage;
            const int64_t copied = r < rows ? w.k_pad : 0;
            std::memcpy(dst, a + r * w.k_pad, copied);
            std::memset(dst + copied, 0, k_stage - copied);
          }
          a = staged;
          lda = k_stage;
        }
        for (int64_t s = 0; s < lay.segments(); ++s) {
          zero_sums();
          const int64_t step_end = std::min(lay.steps, (s + 1) * lay.segment_steps);
          for (int64_t step = s * lay.segment_steps; step < step_end; ++step) {
            const int64_t e = step * lay.kk, bt = step * lay.b_tile_bytes();
            multiply_add(a + e, lda, b0 + bt, b1 + bt, kTileBytes);
          }
          SegmentSums& out = sums[slot];
          store_sums(out);
          if (pending.sums) epilogue.finish(pending);
          pending = Pending{&out, pair_scales + s * kNr, m0, rows, n0, ncols, s == 0, s + 1 == lay.segments()};
          slot ^= 1;
        }
      }
    }
  if (pending.sums) epilogue.finish(pending);
  _tile_release();
}

}  // namespace

void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, bool stream) {
  if (m <= 0 || n_begin >= n_end) return;
  // The tiles' epilogue stores normally (stream is a hint; not measured on an AMX machine yet).
  if (!amx_usable()) return avx512::linear_a8(w, xq, x_scale, m, bias, y, n_begin, n_end, stream);
  const Layout lay(w);
  thread_local a8::Scratch<int8_t> packed_buf;
  const int64_t pair_bytes = lay.pair_bytes();
  const int64_t pairs = (n_end - n_begin + kNr - 1) / kNr;
  auto pack = [&](int64_t j, int8_t* out) {
    const int64_t n0 = n_begin + j * kNr;
    pack_columns(w, lay, n0, std::min<int64_t>(kNr, n_end - n0), out);
  };
  if (m > kMBlock) {  // several row blocks: pack the range once, up front
    int8_t* packed = packed_buf.get(pairs * pair_bytes);
    for (int64_t j = 0; j < pairs; ++j) pack(j, packed + j * pair_bytes);
    run_tiles(w, lay, xq, x_scale, m, bias, y, n_begin, n_end,
              [&](int64_t j) -> const int8_t* { return packed + j * pair_bytes; });
    return;
  }
  // One row block: each pair packed just before use, two buffers in turn (the last segment of a pair is
  // finished, reading its scales, after the next pair has been packed).
  int8_t* packed = packed_buf.get(2 * pair_bytes);
  run_tiles(w, lay, xq, x_scale, m, bias, y, n_begin, n_end, [&](int64_t j) -> const int8_t* {
    int8_t* out = packed + j % 2 * pair_bytes;
    pack(j, out);
    return out;
  });
}

int64_t planar_row_bytes(const WeightView& w, int64_t taps) {
  return a8::round_up(taps * a8::round_up(w.k / taps, 4), kTileBytes);
}

int64_t planar_rows_bytes(const WeightView& w, int64_t taps) {
  return a8::round_up(w.n, kMr) * planar_row_bytes(w, taps);
}

void planar_rows(const WeightView& w, int64_t taps, int8_t* out) {
  const int64_t ld = planar_row_bytes(w, taps), rows = a8::round_up(w.n, kMr);
  const int64_t cin = w.k / taps, cin4 = a8::round_up(cin, 4);
  Layout lay(w);
  lay.kk = kTileBytes;  // whole tile rows
  std::vector<int8_t> codes(a8::round_up(w.k_pad, kTileBytes));  // one stored row as signed codes, (cin, taps)
  for (int64_t n = 0; n < rows; ++n) {
    int8_t* dst = out + n * ld;
    std::memset(dst, 0, ld);
    if (n >= w.n) continue;
    const RowGroups groups(w, n);
    for (int64_t e = 0; e < w.k_pad; e += lay.kk)
      _mm512_storeu_si512(codes.data() + e, weight_bytes(w, lay, groups, n, e));
    for (int64_t c = 0; c < cin; ++c)
      for (int64_t t = 0; t < taps; ++t) dst[t * cin4 + c] = codes[c * taps + t];
  }
}

namespace {

// The epilogue of one 32 x 32 block of the planar product: C tile (a, b) holds channels n0 + 16a + row at pixels
// p0 + 16b + lane.
struct PlanarBlock {
  const SegmentSums* sums = nullptr;
  int64_t n0 = 0, p0 = 0;
};

struct PlanarEpilogue {
  const WeightView& w;
  float x_scale;
  const float* bias;
  float* out;
  int64_t ld_out, p_end;
  bool stream;

  void finish(const PlanarBlock& blk) const {
    const bool finite = std::isfinite(x_scale);
    const __m512 xs = _mm512_set1_ps(x_scale);
    for (int a = 0; a < 2; ++a)
      for (int r = 0; r < kTile; ++r) {
        const int64_t n = blk.n0 + a * kTile + r;
        if (n >= w.n) return;
        const __m512 ws = _mm512_set1_ps(w.scale[n]), b = _mm512_set1_ps(bias ? bias[n] : 0.0f);
        for (int h = 0; h < 2; ++h) {
          const int64_t p = blk.p0 + h * kTile, valid = std::min<int64_t>(kTile, p_end - p);
          if (valid <= 0) break;
          simd512::store_planar(blk.sums->c[2 * a + h] + r * kTile, ws, xs, finite, b, out + n * ld_out + p, valid,
                                stream);
        }
      }
  }
};

}  // namespace

void planar_a8(const int8_t* rows, int64_t ld_w, const WeightView& w, const int8_t* x, int64_t ld_x, float x_scale,
               const float* bias, float* out, int64_t ld_out, int64_t p_begin, int64_t p_end, bool stream) {
  if (p_begin >= p_end) return;
  const int64_t steps = ld_w / kTileBytes;
  const int64_t b_stride = ld_x * 4;  // bytes from one quad of K to the next
  thread_local a8::Scratch<SegmentSums> sums_buf;
  SegmentSums* sums = sums_buf.get(2);
  const PlanarEpilogue epilogue{w, x_scale, bias, out, ld_out, p_end, stream};
  const TileConfig config = tile_config(kTileBytes);
  _tile_loadconfig(&config);
  PlanarBlock pending;
  int slot = 0;
  // Channel blocks outside: a block's A rows (32 x K) stay in L1/L2 over the pixels, while B (K x the pixels)
  // is read from L2 once per block; the other way round a large weight streams from L3 for every 32 pixels.
  for (int64_t n0 = 0; n0 < w.n; n0 += kMr)
    for (int64_t p0 = p_begin; p0 < p_end; p0 += kNr) {
      zero_sums();
      const int8_t* a = rows + n0 * ld_w;
      const int8_t* b = x + p0 * 4;
      for (int64_t step = 0; step < steps; ++step) {
        const int8_t* b_step = b + step * kTile * b_stride;
        multiply_add(a + step * kTileBytes, ld_w, b_step, b_step + kTileBytes, b_stride);
      }
      SegmentSums& s = sums[slot];
      store_sums(s);
      if (pending.sums) epilogue.finish(pending);
      pending = PlanarBlock{&s, n0, p0};
      slot ^= 1;
    }
  if (pending.sums) epilogue.finish(pending);
  _tile_release();
  if (stream) _mm_sfence();
}

int64_t packed_a8_bytes(const WeightView& w) {
  if (!amx_usable()) return 0;
  const Layout lay(w);
  return (w.n + kNr - 1) / kNr * lay.pair_bytes();
}

void pack_a8(const WeightView& w, int64_t n_begin, int64_t n_end, int8_t* packed) {
  const Layout lay(w);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr)
    pack_columns(w, lay, n0, std::min<int64_t>(kNr, w.n - n0), packed + n0 / kNr * lay.pair_bytes());
}

void linear_a8_packed(const WeightView& w, const int8_t* packed, const int8_t* xq, const float* x_scale, int64_t m,
                      const float* bias, float* y, int64_t n_begin, int64_t n_end, [[maybe_unused]] bool stream) {
  if (m <= 0 || n_begin >= n_end) return;
  const Layout lay(w);
  const int8_t* first = packed + n_begin / kNr * lay.pair_bytes();
  run_tiles(w, lay, xq, x_scale, m, bias, y, n_begin, n_end,
            [&](int64_t j) -> const int8_t* { return first + j * lay.pair_bytes(); });
}

}  // namespace qk::amx
