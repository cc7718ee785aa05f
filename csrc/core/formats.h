// The stored weight formats, specified once; quantkernels/formats.py mirrors every constant here and
// docs/FORMATS.md is the same spec in prose. The stored bytes are identical on every machine: a kernel that
// wants another layout builds it in memory and never saves it.
//
// A weight W (N x K) is cut along K into groups of `group_len` elements, one float32 scale per group.
// group_len is the user's group size (32, 64, 128 or 256), or for one group per output channel K (int8) or K
// rounded up to even (int4). K is zero-padded to k_pad = ceil(K / group_len) * group_len; pad elements
// dequantize to exact zero and kernels never read activations past K.
//
// int8, symmetric:  qdata  int8  [N][k_pad]            values -127..127 (-128 never produced)
//                   scale  float [N][k_pad/group_len]  W[n][k] = qdata[n][k] * scale[n][k/group_len]
// int4:             qdata  uint8 [N][k_pad/2]          byte j: element 2j in bits 0-3, element 2j+1 in bits 4-7
//                   scale  float [N][k_pad/group_len]
//                   zero   uint8 [N][k_pad/group_len]  asymmetric only; symmetric uses kInt4SymmetricZero
//                   W[n][k] = (code(n,k) - zero(n, k/group_len)) * scale[n][k/group_len]
// Bits per weight, scales counted: int4 g128 symmetric 4.25, asymmetric 4.3125; int8 per channel ~8.
//
// Dynamic int8 activations: per row x, s = absmax(x) / 127 (float32), xq = nearbyint(x / s) (float32
// division, round half to even). A row with a non-finite absmax yields a NaN output row.
#pragma once

#include <cstdint>

namespace qk {

constexpr int kFormatVersion = 1;
constexpr int kGroupSizes[] = {32, 64, 128, 256};
constexpr int kInt8QMax = 127;
constexpr int kInt4CodeMax = 15;
constexpr int kInt4SymmetricZero = 8;
constexpr int kInt4SymmetricQMax = 7;
constexpr int kActInt8QMax = 127;

static_assert(sizeof(float) == 4, "scales are IEEE float32");
static_assert(kInt4CodeMax == 0xF, "an int4 code fills one nibble");
static_assert(kInt4SymmetricZero - kInt4SymmetricQMax >= 0, "symmetric int4 codes stay unsigned");

// A read-only view of one stored weight. Pointers are row-major and dense.
struct WeightView {
  int bits = 0;                         // 4 or 8
  const void* qdata = nullptr;          // int8 [n][k_pad] or uint8 [n][k_pad / 2]
  const float* scale = nullptr;         // [n][n_groups()]
  const uint8_t* zero_point = nullptr;  // [n][n_groups()]; nullptr: int8, or int4 symmetric (zero = 8)
  int64_t n = 0;                        // output features
  int64_t k = 0;                        // input features (activations have exactly k columns)
  int64_t k_pad = 0;                    // stored columns, a multiple of group_len
  int64_t group_len = 0;

  int64_t n_groups() const { return k_pad / group_len; }
  int64_t row_bytes() const { return bits == 4 ? k_pad / 2 : k_pad; }
  int zero(int64_t row, int64_t group) const {
    if (bits == 8) return 0;
    return zero_point ? zero_point[row * n_groups() + group] : kInt4SymmetricZero;
  }
  // The integer code of element (row, col), signed for int8, 0..15 for int4.
  int code(int64_t row, int64_t col) const {
    if (bits == 8) return static_cast<const int8_t*>(qdata)[row * k_pad + col];
    uint8_t byte = static_cast<const uint8_t*>(qdata)[row * (k_pad / 2) + col / 2];
    return (col & 1) ? (byte >> 4) : (byte & 0xF);
  }
};

// Group length for a user group size (0 = one group per output channel).
inline int64_t group_len_for(int bits, int64_t k, int64_t group_size) {
  if (group_size > 0) return group_size;
  return bits == 4 ? k + (k & 1) : k;
}

inline int64_t padded_k(int bits, int64_t k, int64_t group_size) {
  int64_t g = group_len_for(bits, k, group_size);
  return (k + g - 1) / g * g;
}

}  // namespace qk
