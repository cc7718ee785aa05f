// The SIMD int8-activation kernels behind the linear_a8 and quantize_rows slots of the AVX2, AVX-512 and AMX
// tables (kernels.h documents the contract). Each is defined in its own file, compiled for its instruction set.
#pragma once

#include <cstdint>

#include "formats.h"

namespace qk {
namespace avx512 {
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end);
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale);
}  // namespace avx512
namespace avx2 {
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end);
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale);
}  // namespace avx2
namespace amx {
// Runs avx512::linear_a8 where amx_usable() is false.
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end);
int64_t packed_a8_bytes(const WeightView& w);
void pack_a8(const WeightView& w, int64_t n_begin, int64_t n_end, int8_t* packed);
void linear_a8_packed(const WeightView& w, const int8_t* packed, const int8_t* xq, const float* x_scale, int64_t m,
                      const float* bias, float* y, int64_t n_begin, int64_t n_end);
}  // namespace amx
}  // namespace qk
