// AVX-512 weight-only linear with float activations: the linear_f32 slot of the avx512 table (and of the amx
// table where tiles do not pay off).
//
// Int4 codes become floats by table lookup: vpermps reads only the low 4 bits of each 32-bit index lane, so a
// dword whose low nibble is a code indexes a 16-entry table without masking. Per (row, group) the table holds
// the dequantized weights (c - zero) * scale, computed exactly as the reference does, so each weight costs one
// lookup and one FMA per activation row, and the error is that of a float32 dot product with W itself.
//
// Two weight decodes, each with its own staged-x order (x is reordered once per call, never the nibbles):
//  * wide (group_len a multiple of 128, or one group per row): a 64-byte block holds 128 elements; dword j
//    holds elements 8j..8j+7, one per nibble, so `dword >> 4p` indexes the table for phase p, lane j =
//    element 8j + p. One load, seven shifts and eight lookups per block. (Four loads at byte offsets 0..3
//    need only four shifts, but three of them split cache lines, and measured slower.)
//  * narrow (groups of 32 or 64): 16 bytes zero-extended to dwords, lane j = byte j: elements 2j and 2j+1.
// int8 weights are sign-extended and converted, accumulated per group and scaled at the group's end.
//
// Weights are read once per call for up to 8 activation rows (kMaxRowsPerPass); larger M is cut into blocks
// of 8 that revisit a tile of 16 weight rows while it is still in L1/L2.
// GCC 12's AVX-512 headers pass self-initialised "undefined" vectors to masked builtins, which -Wall reports
// as uninitialized at every use (GCC bug 105593, fixed in GCC 13); silenced for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "linear_f32.h"

#pragma GCC target("avx512f,avx512bw,avx512vl")

#include "dequantize_rows.h"

namespace qk {
namespace {

constexpr int kLanes = 16;                // floats per zmm
constexpr int64_t kWideBlock = 128;       // elements per 64-byte int4 block
constexpr int64_t kNarrowChunk = 32;      // int4 elements per 16-byte chunk
constexpr int64_t kInt8Chunk = 16;        // int8 elements per 16-byte chunk
constexpr int kMaxRowsPerPass = 8;        // activation rows sharing one pass over a weight row
constexpr int64_t kTileRows = 16;         // weight rows revisited by successive blocks of 8 activation rows
constexpr int64_t kStageFloats = 1 << 16; // staged activations per thread (256 KB), but at least 8 rows
// Software prefetch distance along a weight row. The hardware prefetcher alone leaves this loop waiting on
// memory about half the time: a line takes ~110 ns (~360 cycles at 3.3 GHz) to arrive and a row is consumed
// at ~64 bytes per 12 cycles, so asking ~30 lines (2 KB) ahead hides the latency (measured: 1.45x at M = 1).
// Into L2 (T1), not L1: an L1 prefetch holds one of the core's few fill buffers until its line arrives, which
// capped the lines in flight (measured, int4 4096x4096 at M = 1 from memory, 2 threads: 840 -> 625 us).
// Prefetching past the end of the weights is harmless: a prefetch never faults.
constexpr int64_t kPrefetchBytes = 2048;

enum class Decode { int4_wide, int4_narrow, int8 };

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1); }

struct Job {
  WeightView w;
  const float* xs;    // staged activations of this pass, row i at xs + i * xs_stride
  int64_t xs_stride;
  int64_t chunks;     // chunks of the decode that cover columns [0, k)
  const float* bias;  // [w.n] or nullptr
  float* y;           // output rows of this pass, row i at y + i * w.n
};

// code - zero for code = 0..15, one row per zero point of the format (a table per group then costs one
// multiply, which matters at groups of 128: a group is then one 64-byte block).
struct CodesMinusZero {
  alignas(64) float value[16][16];
  constexpr CodesMinusZero() : value() {
    for (int z = 0; z < 16; ++z)
      for (int c = 0; c < 16; ++c) value[z][c] = static_cast<float>(c - z);
  }
};
constexpr CodesMinusZero kCodesMinusZero;

// The 16 dequantized values of one int4 group: (code - zero) * scale for code = 0..15, rounded as the
// reference rounds them. A zero point past 15 is outside the format but not rejected by the ops.
inline __m512 int4_table(const RowGroups& row, int64_t group) {
  const int zero = row.zero_of(group);
  const __m512 codes = zero < 16 ? _mm512_load_ps(kCodesMinusZero.value[zero])
                                 : _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_ps(static_cast<float>(zero)));
  return _mm512_mul_ps(codes, _mm512_set1_ps(row.scale[group]));
}

// Weight rows per pass: one while M <= 4, so that each thread reads its rows as one sequential stream (the
// hardware prefetcher's best case); two above, where x loads (one per FMA at R = 1) would otherwise saturate
// the load ports.
constexpr int rows_for(int m) { return m <= 4 ? 1 : 2; }
// Partial sums per (weight row, activation row): an FMA has 4 cycles of latency and two issue per cycle, so
// eight independent chains keep both FMA ports busy.
constexpr int chains_for(int rows_times_m, int most) {
  return rows_times_m >= 8 ? 1 : std::min(most, 8 / rows_times_m);
}

// acc[r][i][a]: weight row r, activation row i, partial sum a.
template <int R, int M, int A>
using Acc = __m512[R][M][A];

template <int R, int M, int A>
void write_rows(const Job& job, int64_t n, int64_t m0, const Acc<R, M, A>& acc) {
  for (int r = 0; r < R; ++r) {
    const float b = job.bias ? job.bias[n + r] : 0.0f;
    for (int i = 0; i < M; ++i) {
      __m512 sum = acc[r][i][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[r][i][a]);
      job.y[(m0 + i) * job.w.n + n + r] = _mm512_reduce_add_ps(sum) + b;
    }
  }
}

template <int R, int M, int A>
void zero(Acc<R, M, A>& acc) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i)
      for (int a = 0; a < A; ++a) acc[r][i][a] = _mm512_setzero_ps();
}

template <int M, int R>
struct Int4Wide {
  static constexpr int A = chains_for(R * M, 8);

  // One 64-byte block of R rows; Masked reads only the bytes before the rows' ends.
  template <bool Masked>
  __attribute__((always_inline)) static inline void block(const uint8_t* const (&q)[R], int64_t left,
                                                          const __m512 (&table)[R], const float* xb,
                                                          int64_t xs_stride, Acc<R, M, A>& acc) {
    __m512i v[R];
    for (int r = 0; r < R; ++r) {
      v[r] = Masked ? _mm512_maskz_loadu_epi8(left >= 64 ? ~0ull : (1ull << left) - 1, q[r]) : _mm512_loadu_si512(q[r]);
      // Keeps the block in a register: GCC otherwise folds the load into each of the seven shifts, eight
      // loads of one line that compete with the x loads for the load ports (measured 20% slower).
      asm("" : "+v"(v[r]));
    }
    for (int p = 0; p < 8; ++p) {  // phase p: lane j holds element 8j + p of the block, nibble p of dword j
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_permutexvar_ps(p ? _mm512_srli_epi32(v[r], 4 * p) : v[r], table[r]);
      for (int i = 0; i < M; ++i) {
        const __m512 xv = _mm512_load_ps(xb + i * xs_stride + p * kLanes);
        for (int r = 0; r < R; ++r) acc[r][i][p % A] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][p % A]);
      }
    }
  }

  __attribute__((noinline)) static void run(const Job& job, int64_t n, int64_t m0) {
    const WeightView& w = job.w;
    const int64_t row_bytes = w.row_bytes();
    const int64_t blocks_per_group = w.n_groups() == 1 ? job.chunks : w.group_len / kWideBlock;
    const int64_t plain_blocks = row_bytes / 64;  // whole blocks; a partial last one is read masked
    const uint8_t* q[R];
    RowGroups groups[R];
    for (int r = 0; r < R; ++r) {
      q[r] = static_cast<const uint8_t*>(w.qdata) + (n + r) * row_bytes;
      groups[r] = RowGroups(w, n + r);
    }
    const float* xb = job.xs + m0 * job.xs_stride;
    Acc<R, M, A> acc;
    zero<R, M, A>(acc);
    __m512 table[R];
    // One loop per load kind, with the group's tables refreshed inside: nested loops over groups make GCC
    // spill the accumulators at every group boundary.
    int64_t b = 0, g = 0, next_group = 0;
    auto start_group_at = [&](int64_t block) __attribute__((always_inline)) {
      if (block != next_group) return;
      for (int r = 0; r < R; ++r) table[r] = int4_table(groups[r], g);
      ++g;
      next_group += blocks_per_group;
    };
    for (const int64_t plain_end = std::min(plain_blocks, job.chunks); b < plain_end; ++b, xb += kWideBlock) {
      start_group_at(b);
      for (int r = 0; r < R; ++r) prefetch(q[r]);
      block<false>(q, 0, table, xb, job.xs_stride, acc);
      for (int r = 0; r < R; ++r) q[r] += 64;
    }
    for (; b < job.chunks; ++b, xb += kWideBlock) {
      start_group_at(b);
      block<true>(q, row_bytes - b * 64, table, xb, job.xs_stride, acc);
      for (int r = 0; r < R; ++r) q[r] += 64;
    }
    write_rows<R, M, A>(job, n, m0, acc);
  }
};

template <int M, int R>
struct Int4Narrow {
  static constexpr int A = chains_for(R * M, 2);  // chain a = 1: the odd elements, if there are two

  __attribute__((noinline)) static void run(const Job& job, int64_t n, int64_t m0) {
    const WeightView& w = job.w;
    const int64_t row_bytes = w.row_bytes();
    const int64_t chunks_per_group = w.group_len / kNarrowChunk;  // group_len is 32 or 64: row_bytes % 16 == 0
    const uint8_t* q[R];
    RowGroups groups[R];
    for (int r = 0; r < R; ++r) {
      q[r] = static_cast<const uint8_t*>(w.qdata) + (n + r) * row_bytes;
      groups[r] = RowGroups(w, n + r);
    }
    Acc<R, M, A> acc;
    zero<R, M, A>(acc);
    __m512 table[R];
    const float* xc = job.xs + m0 * job.xs_stride;
    // One loop with the group's tables refreshed inside (see Int4Wide).
    for (int64_t c = 0, g = 0, next_group = 0; c < job.chunks; ++c, xc += kNarrowChunk) {
      if (c == next_group) {
        for (int r = 0; r < R; ++r) table[r] = int4_table(groups[r], g);
        ++g;
        next_group += chunks_per_group;
      }
      __m512i v[R];
      for (int r = 0; r < R; ++r) {
        if (c % 4 == 0) prefetch(q[r] + c * 16);
        v[r] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + c * 16)));
      }
      for (int h = 0; h < 2; ++h) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_permutexvar_ps(h ? _mm512_srli_epi32(v[r], 4) : v[r], table[r]);
        for (int i = 0; i < M; ++i) {
          const __m512 xv = _mm512_load_ps(xc + i * job.xs_stride + h * kLanes);
          for (int r = 0; r < R; ++r) acc[r][i][h % A] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][h % A]);
        }
      }
    }
    write_rows<R, M, A>(job, n, m0, acc);
  }
};

template <int M, int R>
struct Int8 {
  static constexpr int A = chains_for(R * M, 4);  // chain a: chunks a, a + A, ... of a group

  // Chunk c of R rows into partial sums a; Masked reads only the `tail` bytes before the rows' ends. Everything
  // the loop needs is passed in registers: read through `job` inside the loop, GCC reloaded the stride and
  // recomputed the x address for every chunk, which cost more than the chunk's three vector instructions.
  template <bool Masked>
  __attribute__((always_inline)) static inline void chunk(const int8_t* const (&q)[R], int64_t c, __mmask16 tail,
                                                          const float* xc, int64_t xs_stride, int a,
                                                          Acc<R, M, A>& acc) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = q[r] + c * kInt8Chunk;
      const __m128i bytes = Masked ? _mm_maskz_loadu_epi8(tail, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    }
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_load_ps(xc + c * kInt8Chunk + i * xs_stride);
      for (int r = 0; r < R; ++r) acc[r][i][a] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][a]);
    }
  }

  __attribute__((noinline)) static void run(const Job& job, int64_t n, int64_t m0) {
    const WeightView& w = job.w;
    const int64_t row_bytes = w.row_bytes(), n_groups = w.n_groups(), chunks = job.chunks;
    const int64_t xs_stride = job.xs_stride;
    // group_len is a multiple of 16 unless there is one group per row.
    const int64_t chunks_per_group = n_groups == 1 ? chunks : w.group_len / kInt8Chunk;
    const int64_t whole_chunks = row_bytes / kInt8Chunk;  // a partial last chunk is read masked
    const __mmask16 tail = static_cast<__mmask16>((1u << (row_bytes % kInt8Chunk)) - 1);
    const int8_t* q[R];
    for (int r = 0; r < R; ++r) q[r] = static_cast<const int8_t*>(w.qdata) + (n + r) * row_bytes;
    const float* xc = job.xs + m0 * xs_stride;
    Acc<R, M, 1> acc;
    Acc<R, M, A> group_acc;
    zero<R, M, 1>(acc);
    for (int64_t c = 0, g = 0; c < chunks; ++g) {
      const int64_t group_end = std::min(c + chunks_per_group, chunks);
      zero<R, M, A>(group_acc);
      for (const int64_t end = std::min(group_end, whole_chunks); c + A <= end; c += A) {
        for (int r = 0; r < R; ++r) prefetch(q[r] + c * kInt8Chunk);
        for (int a = 0; a < A; ++a) chunk<false>(q, c + a, tail, xc, xs_stride, a, group_acc);
      }
      for (; c < group_end; ++c) {
        if (c < whole_chunks) chunk<false>(q, c, tail, xc, xs_stride, 0, group_acc);
        else chunk<true>(q, c, tail, xc, xs_stride, 0, group_acc);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(w.scale[(n + r) * n_groups + g]);
        for (int i = 0; i < M; ++i) {
          __m512 sum = group_acc[r][i][0];
          for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, group_acc[r][i][a]);
          acc[r][i][0] = _mm512_fmadd_ps(sum, s, acc[r][i][0]);
        }
      }
    }
    write_rows<R, M, 1>(job, n, m0, acc);
  }
};

// Weight rows [n0, n1) for activation rows [m0, m0 + M): R rows per pass, then the rest one by one.
template <template <int, int> class Kernel, int M>
void run_rows(const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int R = rows_for(M);
  int64_t n = n0;
  for (; n + R <= n1; n += R) Kernel<M, R>::run(job, n, m0);
  for (; n < n1; ++n) Kernel<M, 1>::run(job, n, m0);
}

template <template <int, int> class Kernel>
void run_rows(int64_t m, const Job& job, int64_t n0, int64_t n1, int64_t m0) {
  switch (m) {
    case 1: return run_rows<Kernel, 1>(job, n0, n1, m0);
    case 2: return run_rows<Kernel, 2>(job, n0, n1, m0);
    case 3: return run_rows<Kernel, 3>(job, n0, n1, m0);
    case 4: return run_rows<Kernel, 4>(job, n0, n1, m0);
    case 5: return run_rows<Kernel, 5>(job, n0, n1, m0);
    case 6: return run_rows<Kernel, 6>(job, n0, n1, m0);
    case 7: return run_rows<Kernel, 7>(job, n0, n1, m0);
    default: return run_rows<Kernel, 8>(job, n0, n1, m0);
  }
}

// Stages activation rows in the order `decode` produces weight elements (see the top of this file).
void stage_rows(const void* x, ActType type, int64_t rows, int64_t k, Decode decode, int64_t len, float* out) {
  float* plain = decode == Decode::int8 ? nullptr : staging_buffer(1, len);
  for (int64_t i = 0; i < rows; ++i) {
    const void* row = static_cast<const char*>(x) + i * k * act_bytes(type);
    float* dst = out + i * len;
    if (decode == Decode::int8) {
      load_row_avx512(row, type, k, len, dst);
      continue;
    }
    load_row_avx512(row, type, k, len, plain);
    if (decode == Decode::int4_wide) {
      for (int64_t b = 0; b < len; b += kWideBlock)
        for (int j = 0; j < kLanes; ++j)
          for (int p = 0; p < 8; ++p) dst[b + p * kLanes + j] = plain[b + 8 * j + p];
    } else {
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      for (int64_t c = 0; c < len; c += kNarrowChunk) {
        const __m512 lo = _mm512_load_ps(plain + c), hi = _mm512_load_ps(plain + c + kLanes);
        _mm512_store_ps(dst + c, _mm512_permutex2var_ps(lo, even, hi));
        _mm512_store_ps(dst + c + kLanes, _mm512_permutex2var_ps(lo, odd, hi));
      }
    }
  }
}

}  // namespace

void load_row_avx512(const void* x, ActType type, int64_t k, int64_t len, float* out) {
  for (int64_t i = 0; i < len; i += kLanes) {
    const int64_t left = k - i;
    const __mmask16 mask = left >= kLanes ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    __m512 v;
    if (type == ActType::f32) {
      v = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i);
      v = type == ActType::bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                : _mm512_cvtph_ps(h);
    }
    _mm512_store_ps(out + i, v);
  }
}

void linear_f32_avx512(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                       int64_t n_begin, int64_t n_end) {
  Decode decode = Decode::int8;
  int64_t chunk = kInt8Chunk;
  if (w.bits == 4) {
    const bool wide = w.group_len % kWideBlock == 0 || w.n_groups() == 1;
    decode = wide ? Decode::int4_wide : Decode::int4_narrow;
    chunk = wide ? kWideBlock : kNarrowChunk;
  }
  const int64_t chunks = (w.k + chunk - 1) / chunk, len = chunks * chunk;
  const int64_t rows_per_stage = std::min(m, std::max<int64_t>(kMaxRowsPerPass, kStageFloats / len));
  float* staged = staging_buffer(0, rows_per_stage * len);
  for (int64_t s0 = 0; s0 < m; s0 += rows_per_stage) {
    const int64_t rows = std::min(rows_per_stage, m - s0);
    stage_rows(static_cast<const char*>(x) + s0 * w.k * act_bytes(x_type), x_type, rows, w.k, decode, len, staged);
    const Job job{w, staged, len, chunks, bias, y + s0 * w.n};
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, n_end);
      for (int64_t m0 = 0; m0 < rows; m0 += kMaxRowsPerPass) {
        const int64_t mb = std::min<int64_t>(kMaxRowsPerPass, rows - m0);
        switch (decode) {
          case Decode::int4_wide: run_rows<Int4Wide>(mb, job, n0, n1, m0); break;
          case Decode::int4_narrow: run_rows<Int4Narrow>(mb, job, n0, n1, m0); break;
          case Decode::int8: run_rows<Int8>(mb, job, n0, n1, m0); break;
        }
      }
    }
  }
}

void dequantize_rows_avx512(const WeightView& w, int64_t n_begin, int64_t n_end, float* out) {
  dequantize_rows_loop(w, n_begin, n_end, out);
}

}  // namespace qk
