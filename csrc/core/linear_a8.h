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
// The planar product of a 1x1 conv over NCHW activations: out[n][p] = (sum_k W[n][k] * X[k][p]) * scale[n] *
// x_scale + bias[n] for every n and p_begin <= p < p_end, NaN throughout for a non-finite x_scale. W is w (one
// scale group per row, k_pad <= 65536) as planar_rows lays it out: int8 rows of K padded to 64, zero past it,
// rows to a multiple of 32. X: int32 words [k_pad rounded up to 64, / 4][ld_x], byte j of word (q, p) the code
// of channel 4q + j at pixel p (ConvKernels::quantize_quads), ld_x a multiple of 32 >= p_end, zero past K.
// stream: write whole aligned vectors around the caches.
int64_t planar_rows_bytes(const WeightView& w);
void planar_rows(const WeightView& w, int8_t* rows);
void planar_a8(const int8_t* rows, const WeightView& w, const int8_t* x, int64_t ld_x, float x_scale,
               const float* bias, float* out, int64_t ld_out, int64_t p_begin, int64_t p_end, bool stream);
void pack_a8(const WeightView& w, int64_t n_begin, int64_t n_end, int8_t* packed);
void linear_a8_packed(const WeightView& w, const int8_t* packed, const int8_t* xq, const float* x_scale, int64_t m,
                      const float* bias, float* y, int64_t n_begin, int64_t n_end);
}  // namespace amx
}  // namespace qk
