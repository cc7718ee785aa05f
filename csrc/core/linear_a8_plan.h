// Blocking and scratch memory shared by the SIMD int8-activation kernels (linear_a8_avx512.cpp,
// linear_a8_avx2.cpp). ISA-neutral: included before each file's target pragma.
//
// Both kernels compute, for one output column n and one segment of K (a weight group, or a piece of the
// single group of a per-channel weight),
//
//   sum_k (code - zero) * xq  =  sum_k w * (xq + 128)  -  128 * sum_k w,      w = code - zero (int8: w = code)
//
// with unsigned activations u = xq + 128 (0..255) against signed weights w (int4: -15..15, int8: -128..127), the
// operand signs of vpdpbusd / vpmaddubsw. The second term depends on the weights only: it is computed once per
// panel and starts the integer accumulator, so no per-row sum of activations is needed. Any weight value facing
// an activation of 0 (the padding past k) cancels exactly, so padding needs no masking.
//
// Weights are packed per call into panels: for each step of 4 K elements, kNr consecutive output columns, each a
// 32-bit lane holding that column's 4 weights. int4 bytes hold elements 2j and 2j+1; instead of re-interleaving
// nibbles, the staged activations are permuted: within every 8 elements, the step of the low nibbles (elements
// 0, 2, 4, 6) comes first, then the step of the high nibbles (1, 3, 5, 7).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "formats.h"

namespace qk::a8 {

// Elements per step: the 4 bytes of one 32-bit lane of vpdpbusd (or of vpmaddubsw followed by vpmaddwd).
constexpr int64_t kStep = 4;
// The VNNI and AVX2 kernels pad staged activation rows to a multiple of 16 elements: the int4 de-interleave works
// on 8 elements and the AVX2 kernel sums 4 steps in int16 before widening.
constexpr int64_t kKAlign = 16;
// K block: the panel of one block (512 elements x 32 columns = 16 KiB for AVX-512) stays in the 48 KiB L1d while
// every row of the M chunk passes over it. A multiple of 256, so a block holds whole groups of every size.
constexpr int64_t kKBlock = 512;
// Rows of activations staged at once: bounds the thread-local buffers (kMChunk x K bytes of activations,
// kMChunk x kNr floats of accumulators) for very tall inputs (conv im2col); M <= 256 takes one chunk and
// packs each weight panel once.
constexpr int64_t kMChunk = 256;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// How K is cut into blocks and segments. A segment is a run of K that shares one scale per column: a group, or
// for per-channel weights the part of the one group inside a block. Every segment of a block has the same length.
struct Plan {
  int64_t k_round = 0;  // k_pad rounded up to k_align: the length of a staged activation row
  // Bytes from one staged row to the next: an odd number of 64-byte lines, so that the rows a microkernel reads
  // side by side fall in different L1 sets (with K = 4096 they would all share one set and evict each other).
  int64_t row_stride = 0;
  int64_t group_len = 0;
  bool per_channel = false;

  // k_align: a multiple of 16 dividing kKBlock (kKAlign, or the K of one AMX step).
  Plan(const WeightView& w, int64_t k_align)
      : k_round(round_up(w.k_pad, k_align)),
        row_stride(round_up(k_round, 128) + 64),
        group_len(w.group_len),
        per_channel(w.n_groups() == 1) {}

  int64_t n_blocks() const { return (k_round + kKBlock - 1) / kKBlock; }
  int64_t block_begin(int64_t b) const { return b * kKBlock; }
  int64_t block_len(int64_t b) const { return std::min(kKBlock, k_round - b * kKBlock); }
  int64_t segment_len(int64_t b) const { return per_channel ? block_len(b) : group_len; }
  int64_t n_segments(int64_t b) const { return block_len(b) / segment_len(b); }
  // The weight group (index into scale / zero_point) of segment i of block b.
  int64_t group_of(int64_t b, int64_t i) const {
    return per_channel ? 0 : (block_begin(b) + i * group_len) / group_len;
  }
};

// A grow-only, 64-byte aligned scratch array, one per thread (thread_local), so that repeated calls neither
// allocate nor fault in fresh pages.
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }

  T* get(size_t count) {
    if (count > capacity_) {
      std::free(data_);
      const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
      data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) throw std::bad_alloc();
      capacity_ = count;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace qk::a8
