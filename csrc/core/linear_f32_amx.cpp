// AMX weight-only linear for int4 weights with float activations of a few rows or more: the linear_f32 slot of
// the amx table.
//
// Tiles of 16 weight rows are decoded to bfloat16 (c - zero), which is exact for every code, and multiplied
// with x on the tile unit (TDPBF16PS: exact bf16 products, float32 accumulation). x is split into bf16 pieces
// whose sum is exactly x: one for bfloat16, two for float16 (11 significant bits), three for float32 (24; a
// piece below 2^-126 would be flushed by the tile unit, an error under 2^-126 * |w|); the pieces are extra columns
// of the B tile, summed after the K loop. So the result has the error of a float32 dot product, and the
// group's scale multiplies the tile's partial sums at the group's end.
//
// Layouts. A 64-byte block of a weight row holds 128 elements; its 16-bit word j holds elements 4j..4j+3, one
// per nibble, so `word >> 4t` indexes a 32-entry vpermw table (16 values, twice: the index's bit 4 belongs to
// the next nibble) and gives the A-tile row of phase t: 32 elements 4j + t. In a TDPBF16PS, A[r][2kk + i] meets
// B[kk][2c + i], i.e. block element 8kk + 4i + t; x is staged in that order once per call.
//
// When the tiles pay off (use_tiles): decoding to bf16 and storing the A tiles costs about two passes of the
// AVX-512 FMA kernel over the same weights, and covers up to 16 columns; the FMA kernel's cost grows with M.
// Measured on Sapphire Rapids (K = 4096, weights in L2, cycles per 128 weights, tiles / FMA): the tiles win from
// 2 bfloat16 rows and 3 float16 or float32 rows (float32: M = 3 32 / 33-39, M = 4 36 / 52, M = 8 79 / 104,
// M = 16 159 / 207; at M = 2 FMA wins, 24 / 28). Groups of 32 or 64 (they do not hold whole blocks) and int8
// weights, and machines or OSes without usable AMX, run linear_f32_avx512.
// GCC 12's AVX-512 headers pass self-initialised "undefined" vectors to masked builtins, which -Wall reports
// as uninitialized at every use (GCC bug 105593, fixed in GCC 13); silenced for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#include "linear_f32.h"

#pragma GCC target("avx512f,avx512bw,avx512vl")

namespace qk {
namespace {

constexpr int64_t kBlock = 128;  // elements per 64-byte block of a weight row
constexpr int kTileRows = 16;    // weight rows per tile (A and C rows)
constexpr int kPhases = 4;       // A tiles per block: elements 4j + t
constexpr int kPairs = 16;       // B rows: 32 elements as bf16 pairs
constexpr int kMaxColumns = 16;  // float32 columns of a C tile (64 bytes)
// Activation rows staged at a time: 16 passes of 16 bf16 rows over each weight tile. Bounds the staged B
// tiles (256 rows x K x 2 bytes x pieces) while weights re-read per stage are amortized over 256 rows.
constexpr int64_t kRowsPerStage = 256;
constexpr int kLanes = 16;  // floats per zmm
// Tile registers: C tiles tmm0..3 (block b accumulates into b % 4, see run_pass); A alternates tmm4 / tmm7
// and B tmm5 / tmm6, so that a load never waits for the multiply still reading the previous tile.
constexpr int kTileA0 = 4, kTileB0 = 5, kTileB1 = 6, kTileA1 = 7;

// The tile configuration (Intel SDM, LDTILECFG): palette 1, bytes per row and rows of each tile.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// The tile instructions. GCC's intrinsics paste the tile number into the mnemonic, so it cannot be a template
// parameter, and their loads do not tell the compiler they read memory; these take the number as an "n"
// operand and clobber memory, so that the stores filling a buffer stay ahead of the tile load reading it.
template <int T>
inline void tile_load(const void* base, long stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void tile_store(void* base, long stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"n"(T));
}
// C += A * B over bf16 pairs, float32 accumulation.
template <int C, int A, int B>
inline void tile_dpbf16ps() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
}
inline void tile_load_config(const TileConfig& config) { asm volatile("ldtilecfg %0" ::"m"(config) : "memory"); }
inline void tile_release() { asm volatile("tilerelease" ::: "memory"); }

// bf16 pieces per activation value that sum to it exactly: bf16 holds 8 significant bits, float16 11, float32 24.
int pieces_for(ActType t) { return t == ActType::bf16 ? 1 : t == ActType::f16 ? 2 : 3; }

// Round to nearest even bf16, kept in the high half of each float32 lane. NaN stays NaN (quieted).
inline __m512i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                           _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(rounded, nan, _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))),
                              _mm512_set1_epi32(0x00400000));
}

// The 32-entry vpermw tables, bf16(c - zero) for c = 0..15 twice, one per zero point of the format.
struct DecodeTables {
  alignas(64) uint16_t value[16][32];
  DecodeTables() {
    for (int z = 0; z < 16; ++z)
      for (int i = 0; i < 32; ++i) {
        const float v = static_cast<float>((i & 15) - z);  // an integer of at most 4 bits: exact in bf16
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        value[z][i] = static_cast<uint16_t>(bits >> 16);
      }
  }
  // A zero point past 15 is outside the format but not checked by the ops (that would cost a pass over the
  // zero points): it gets a table built here, as exact (|c - z| <= 255 fits bf16), instead of a read past
  // the array.
  __m512i get(int zero) const {
    if (zero < 16) return _mm512_load_si512(value[zero]);
    const __m512i codes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(codes, _mm512_set1_epi32(zero)));
    const __m256i words = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
    return _mm512_inserti64x4(_mm512_castsi256_si512(words), words, 1);
  }
};

// How the activation rows of a call map onto B tiles.
struct Plan {
  int pieces;             // bf16 pieces per activation value
  int64_t rows_per_pass;  // activation rows per C tile: columns = rows_per_pass * pieces <= 16
  int64_t passes;         // passes over each weight tile, one per group of rows_per_pass activation rows
  int columns;            // float32 columns of the C and B tiles
  int64_t blocks;         // 64-byte blocks covering columns [0, k)
  int64_t b_tile_elems() const { return kPairs * columns * 2; }
  int64_t pass_elems() const { return blocks * kPhases * b_tile_elems(); }
};

// B tiles of every pass: tile (pass, block, t) row kk holds, for each column (row m, piece q), the pair of
// elements 4j + t of the block with j = 2kk, 2kk + 1, as bf16 piece q.
void stage_b(const void* x, ActType type, int64_t m, int64_t k, const Plan& plan, uint16_t* b_tiles) {
  const int64_t len = plan.blocks * kBlock;
  if (m % plan.rows_per_pass != 0)  // the last pass has columns of no activation row: zeros
    std::memset(b_tiles + (plan.passes - 1) * plan.pass_elems(), 0, sizeof(uint16_t) * plan.pass_elems());
  float* row_f32 = staging_buffer(1, (1 + plan.pieces) * len);
  uint16_t* pieces = reinterpret_cast<uint16_t*>(row_f32 + len);  // [piece][len], zero past k
  for (int64_t i = 0; i < m; ++i) {
    const void* row = static_cast<const char*>(x) + i * k * act_bytes(type);
    if (type == ActType::bf16) {  // its own single piece
      std::memcpy(pieces, row, sizeof(uint16_t) * k);
      std::memset(pieces + k, 0, sizeof(uint16_t) * (len - k));
    } else {
      load_row_avx512(row, type, k, len, row_f32);
      for (int64_t e = 0; e < len; e += kLanes) {
        __m512 v = _mm512_load_ps(row_f32 + e);
        for (int q = 0; q < plan.pieces; ++q) {
          const __m512i head = to_bf16(v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pieces + q * len + e),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
          // The rest, exact in float32; zero where x is infinite or NaN (head - head is NaN there), so that
          // inf * w comes out as the reference's.
          const __m512 h = _mm512_castsi512_ps(head);
          const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(h, h), _mm512_setzero_ps(), _CMP_EQ_OQ);
          v = _mm512_maskz_sub_ps(finite, v, h);
        }
      }
    }
    uint16_t* pass_tiles = b_tiles + (i / plan.rows_per_pass) * plan.pass_elems();
    // 4j for j = 0..31 in the 16-bit lanes: permutex2var reads 6 bits, so 4j + t picks element 4j + t of
    // (w0, w1) for j < 16 and element 4(j - 16) + t of (w2, w3) for j >= 16.
    const __m512i four_j = _mm512_setr_epi32(0x00040000, 0x000C0008, 0x00140010, 0x001C0018, 0x00240020, 0x002C0028,
                                             0x00340030, 0x003C0038, 0x00440040, 0x004C0048, 0x00540050, 0x005C0058,
                                             0x00640060, 0x006C0068, 0x00740070, 0x007C0078);
    for (int q = 0; q < plan.pieces; ++q) {
      const int64_t column = (i % plan.rows_per_pass) * plan.pieces + q;
      const __m512i rows_at = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                                   _mm512_set1_epi32(plan.columns)),
                                               _mm512_set1_epi32(static_cast<int>(column)));
      for (int64_t b = 0; b < plan.blocks; ++b) {
        const uint16_t* src = pieces + q * len + b * kBlock;
        const __m512i w0 = _mm512_loadu_si512(src), w1 = _mm512_loadu_si512(src + 32);
        const __m512i w2 = _mm512_loadu_si512(src + 64), w3 = _mm512_loadu_si512(src + 96);
        for (int t = 0; t < kPhases; ++t) {
          // Words j of phase t, element 4j + t; as 16 dwords, the pairs (2kk, 2kk + 1) of B rows kk = 0..15.
          const __m512i index = _mm512_add_epi16(four_j, _mm512_set1_epi16(static_cast<short>(t)));
          const __m512i pairs = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_permutex2var_epi16(w0, index, w1),
                                                        _mm512_permutex2var_epi16(w2, index, w3));
          int32_t* tile = reinterpret_cast<int32_t*>(pass_tiles + (b * kPhases + t) * plan.b_tile_elems());
          _mm512_i32scatter_epi32(tile, rows_at, pairs, 4);
        }
      }
    }
  }
}

// Decodes block b of `rows` weight rows into the four A tiles a_tiles[t][row][32 bf16].
inline void decode_block(const WeightView& w, int64_t n0, int rows, const RowGroups* groups, int64_t b,
                         int64_t group, const DecodeTables& tables, uint16_t* a_tiles) {
  const int64_t row_bytes = w.row_bytes(), left = row_bytes - b * 64;
  const __mmask64 mask = left >= 64 ? ~0ull : (1ull << left) - 1;  // left >= 1: block b holds a column < k
  for (int r = 0; r < rows; ++r) {
    const uint8_t* q = static_cast<const uint8_t*>(w.qdata) + (n0 + r) * row_bytes + b * 64;
    const __m512i v = left >= 64 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8(mask, q);
    const __m512i table = tables.get(groups[r].zero_of(group));
    for (int t = 0; t < kPhases; ++t) {
      const __m512i a = _mm512_permutexvar_epi16(t ? _mm512_srli_epi16(v, 4 * t) : v, table);
      _mm512_store_si512(a_tiles + (t * kTileRows + r) * 32, a);
    }
  }
}

// The four phases of a block into C tile C.
template <int C>
inline void multiply_block(const uint16_t* a_tiles, const uint16_t* b_tiles, int64_t b_tile_elems, long b_stride) {
  tile_load<kTileA0>(a_tiles, 64);
  tile_load<kTileB0>(b_tiles, b_stride);
  tile_dpbf16ps<C, kTileA0, kTileB0>();
  tile_load<kTileA1>(a_tiles + kTileRows * 32, 64);
  tile_load<kTileB1>(b_tiles + b_tile_elems, b_stride);
  tile_dpbf16ps<C, kTileA1, kTileB1>();
  tile_load<kTileA0>(a_tiles + 2 * kTileRows * 32, 64);
  tile_load<kTileB0>(b_tiles + 2 * b_tile_elems, b_stride);
  tile_dpbf16ps<C, kTileA0, kTileB0>();
  tile_load<kTileA1>(a_tiles + 3 * kTileRows * 32, 64);
  tile_load<kTileB1>(b_tiles + 3 * b_tile_elems, b_stride);
  tile_dpbf16ps<C, kTileA1, kTileB1>();
}

// acc[row][column] += scale[row] * C tile C, and C restarts from zero.
template <int C>
inline void flush(int rows, const RowGroups* groups, int64_t group, float* c_buffer, float* acc) {
  tile_store<C>(c_buffer, 64);
  tile_zero<C>();
  for (int r = 0; r < rows; ++r) {
    const __m512 s = _mm512_set1_ps(groups[r].scale[group]);
    _mm512_store_ps(acc + r * kMaxColumns, _mm512_fmadd_ps(_mm512_load_ps(c_buffer + r * kMaxColumns), s,
                                                           _mm512_load_ps(acc + r * kMaxColumns)));
  }
}

// The tile number as a template argument: C tiles rotate at run time.
template <typename F>
inline void with_c_tile(int64_t c, F&& f) {
  switch (c & 3) {
    case 0: return f(std::integral_constant<int, 0>());
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    default: return f(std::integral_constant<int, 3>());
  }
}

// Per-thread scratch of one tile pass: two sets of A tiles (decode fills one while the tile unit reads the
// other), a C tile being flushed and the scaled sums.
struct Scratch {
  alignas(64) uint16_t a_tiles[2][kPhases * kTileRows * 32];
  alignas(64) float c_buffer[kTileRows * kMaxColumns];
  alignas(64) float acc[kTileRows * kMaxColumns];
};

// One pass of weight rows [n0, n0 + rows), rows <= 16, against the B tiles of one pass: acc receives the
// scaled sums. A tdpbf16ps into the C tile of the one before waits for its result, so block b accumulates
// into C tile b % 4 (four chains in flight), and a C tile only ever holds one group. A group of one block is
// flushed two blocks later, when its multiplies have surely finished; longer groups (and one group per row)
// are flushed at their end.
// Block b + 1 is decoded before block b is multiplied: a tile load cannot take data from stores still in
// flight, so the A tiles it reads should have been written a block earlier. `prefetch` (or nullptr) is the
// next tile's weights, fetched into L2 a slice per block while this tile computes.
void run_pass(const WeightView& w, int64_t n0, int rows, const Plan& plan, const uint16_t* b_tiles,
              const DecodeTables& tables, const char* prefetch, int64_t prefetch_bytes, Scratch& scratch) {
  const int64_t blocks_per_group = w.n_groups() == 1 ? plan.blocks : w.group_len / kBlock;
  const int64_t prefetch_per_block = (prefetch_bytes + plan.blocks - 1) / plan.blocks;
  const long b_stride = plan.columns * 4;
  std::memset(scratch.acc, 0, sizeof scratch.acc);
  if (rows < kTileRows) std::memset(scratch.a_tiles, 0, sizeof scratch.a_tiles);  // rows past the end: zeros
  tile_zero<0>();
  tile_zero<1>();
  tile_zero<2>();
  tile_zero<3>();
  RowGroups groups[kTileRows];
  for (int r = 0; r < rows; ++r) groups[r] = RowGroups(w, n0 + r);
  auto flush_block = [&](int64_t block) {
    with_c_tile(block, [&](auto c) { flush<c>(rows, groups, block / blocks_per_group, scratch.c_buffer, scratch.acc); });
  };
  decode_block(w, n0, rows, groups, 0, 0, tables, scratch.a_tiles[0]);
  for (int64_t b = 0; b < plan.blocks; ++b) {
    if (b + 1 < plan.blocks)
      decode_block(w, n0, rows, groups, b + 1, (b + 1) / blocks_per_group, tables, scratch.a_tiles[(b + 1) & 1]);
    if (prefetch)
      for (int64_t at = b * prefetch_per_block; at < std::min((b + 1) * prefetch_per_block, prefetch_bytes); at += 64)
        _mm_prefetch(prefetch + at, _MM_HINT_T1);
    const uint16_t* bb = b_tiles + b * kPhases * plan.b_tile_elems();
    with_c_tile(b, [&](auto c) { multiply_block<c>(scratch.a_tiles[b & 1], bb, plan.b_tile_elems(), b_stride); });
    if (blocks_per_group == 1) {
      if (b >= 2) flush_block(b - 2);
    } else if (b + 1 == plan.blocks || (b + 1) % blocks_per_group == 0) {
      for (int64_t used = b; used >= 0 && used > b - std::min<int64_t>(4, blocks_per_group); --used)
        if (used / blocks_per_group == b / blocks_per_group) flush_block(used);
    }
  }
  if (blocks_per_group == 1)
    for (int64_t b = std::max<int64_t>(0, plan.blocks - 2); b < plan.blocks; ++b) flush_block(b);
}

}  // namespace

bool amx_tiles_apply(const WeightView& w, ActType t, int64_t m) {
  if (w.bits != 4 || !(w.group_len % kBlock == 0 || w.n_groups() == 1) || !amx_usable()) return false;
  return (t == ActType::bf16 && m >= 2) || m >= 3;
}

void linear_f32_amx(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                    int64_t n_begin, int64_t n_end) {
  if (!amx_tiles_apply(w, x_type, m)) return linear_f32_avx512(w, x, x_type, m, bias, y, n_begin, n_end);
  static const DecodeTables tables;
  Scratch scratch{};  // zeros: a C tile store fills only `columns` lanes of each row, the rest must stay 0
  for (int64_t s0 = 0; s0 < m; s0 += kRowsPerStage) {
    const int64_t rows_m = std::min(kRowsPerStage, m - s0);
    Plan plan;
    plan.pieces = pieces_for(x_type);
    plan.blocks = (w.k + kBlock - 1) / kBlock;
    plan.rows_per_pass = std::min<int64_t>(rows_m, kMaxColumns / plan.pieces);
    plan.passes = (rows_m + plan.rows_per_pass - 1) / plan.rows_per_pass;
    plan.columns = static_cast<int>(plan.rows_per_pass) * plan.pieces;
    // bf16 B tiles in a float buffer: two per float.
    uint16_t* b_tiles = reinterpret_cast<uint16_t*>(staging_buffer(0, plan.passes * plan.pass_elems() / 2 + 1));
    stage_b(static_cast<const char*>(x) + s0 * w.k * act_bytes(x_type), x_type, rows_m, w.k, plan, b_tiles);
    float* y_stage = y + s0 * w.n;

    TileConfig config;
    for (int c = 0; c < 4; ++c) config.rows[c] = kTileRows, config.colsb[c] = plan.columns * 4;
    for (int a : {kTileA0, kTileA1}) config.rows[a] = kTileRows, config.colsb[a] = 64;
    for (int b : {kTileB0, kTileB1}) config.rows[b] = kPairs, config.colsb[b] = plan.columns * 4;
    tile_load_config(config);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, n_end - n0));
      // The next tile's weights, prefetched during the first pass (the rows of a tile are contiguous).
      const int64_t next_rows = std::min<int64_t>(kTileRows, n_end - n0 - kTileRows);
      const char* next = next_rows > 0 ? static_cast<const char*>(w.qdata) + (n0 + kTileRows) * w.row_bytes() : nullptr;
      for (int64_t pass = 0; pass < plan.passes; ++pass) {  // the weight tile stays in L1 / L2 across passes
        run_pass(w, n0, rows, plan, b_tiles + pass * plan.pass_elems(), tables, pass == 0 ? next : nullptr,
                 next_rows * w.row_bytes(), scratch);
        const int64_t m0 = pass * plan.rows_per_pass, m1 = std::min(rows_m, m0 + plan.rows_per_pass);
        for (int64_t i = m0; i < m1; ++i)
          for (int r = 0; r < rows; ++r) {
            const float* sums = scratch.acc + r * kMaxColumns + (i - m0) * plan.pieces;
            float sum = sums[0];
            for (int q = 1; q < plan.pieces; ++q) sum += sums[q];
            y_stage[i * w.n + n0 + r] = sum + (bias ? bias[n0 + r] : 0.0f);
          }
      }
    }
    tile_release();
  }
}

}  // namespace qk
