// The weight-only linear kernels with float activations (the linear_f32 slot of each ISA table), and the
// scalar pieces they share: activation element conversion and the per-thread staging buffer.
//
// Every kernel stages x once per call (each thread its own copy): converted to float32, zero past column k,
// and reordered into the order its weight decode produces elements, so that nibbles are never shuffled.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace qk {

void linear_f32_avx512(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                       int64_t n_begin, int64_t n_end);
// Converts an activation row x[0..k) to float32 into out[0..len), len a multiple of 16, zero past k; out is
// 64-byte aligned. AVX-512, shared by the avx512 and amx kernels.
void load_row_avx512(const void* x, ActType type, int64_t k, int64_t len, float* out);
// The amx table's kernel: int4 weights whose groups hold whole 64-byte blocks, with bfloat16 or float16 x of
// enough rows, run on AMX tiles; everything else, and every call on a machine or OS without usable AMX, goes
// to linear_f32_avx512.
void linear_f32_amx(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                    int64_t n_begin, int64_t n_end);
void linear_f32_avx2(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                     int64_t n_begin, int64_t n_end);
// The dequantize_rows slot of the avx2 and avx512 (and amx) tables: dequantize_rows.h at each vector width.
void dequantize_rows_avx2(const WeightView& w, int64_t n_begin, int64_t n_end, float* out);
void dequantize_rows_avx512(const WeightView& w, int64_t n_begin, int64_t n_end, float* out);

// The scales and zero points of one weight row, by group. WeightView::zero() and n_groups() divide by
// group_len on every call, which costs more than the rest of a 128-weight block in an inner loop.
struct RowGroups {
  const float* scale = nullptr;    // [n_groups]
  const uint8_t* zero = nullptr;   // [n_groups]; nullptr: every group has zero point `fixed_zero`
  int fixed_zero = 0;              // 8 for symmetric int4, 0 for int8
  RowGroups() = default;
  RowGroups(const WeightView& w, int64_t row) {
    const int64_t n_groups = w.n_groups();
    scale = w.scale + row * n_groups;
    if (w.bits == 4 && w.zero_point) zero = w.zero_point + row * n_groups;
    fixed_zero = w.bits == 4 ? kInt4SymmetricZero : 0;
  }
  int zero_of(int64_t group) const { return zero ? zero[group] : fixed_zero; }
};

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bfloat16 is the top half of a float32.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 -> binary32, exact for every value (subnormals, infinities and NaN payloads included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

// Element i of an activation row of type t, as float32.
inline float act_value(const void* row, ActType t, int64_t i) {
  switch (t) {
    case ActType::bf16: return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
    case ActType::f16: return half_to_float(static_cast<const uint16_t*>(row)[i]);
    case ActType::f32: break;
  }
  return static_cast<const float*>(row)[i];
}

inline int64_t act_bytes(ActType t) { return t == ActType::f32 ? 4 : 2; }

// A per-thread float buffer of at least `floats` elements, 64-byte aligned. Reused across calls, so the
// kernels allocate nothing once warm; valid until the next call from the same thread.
inline float* staging_buffer(int slot, int64_t floats) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < floats + 16) b.resize(floats + 16);
  const uintptr_t address = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<float*>((address + 63) & ~static_cast<uintptr_t>(63));
}

}  // namespace qk
