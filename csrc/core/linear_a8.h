// The SIMD int8-activation kernels behind the linear_a8 and quantize_rows slots of the AVX2, AVX-512 and AMX
// tables (kernels.h documents the contract). Each is defined in its own file, compiled for its instruction set.
#pragma once

#include <cstdint>

#include "formats.h"

namespace qk {
// Columns [begin, end) of a planar product's X, one image's output pixels: they are quantized by x_scale and
// column c of output channel n goes to out[n * ld_out + c - begin].
struct PlanarPiece {
  int64_t begin = 0, end = 0;
  float x_scale = 1.0f;
  float* out = nullptr;
};

namespace avx512 {
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, bool stream);
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale);
// amx::planar_a8 (below) on VNNI: the same weight rows (amx::planar_rows, plain AVX-512 code), the same results
// (exact int32 sums, the same epilogue); vpdpbusd takes the activations as u = code + 128, so each row also needs
// corrections[n] = -128 * its sum of weights (planar_corrections: entries [n_begin, n_end) of an array of
// planar_corrections_len(w.n), for rows up to that length).
// The columns of X may hold several images' pixels one after another (small images packed so that the 16-lane
// vectors are full): pieces[0 .. count) in column order, each one image's run of columns with its own scale and
// destination, adjacent (pieces[i].end == pieces[i + 1].begin); ld_x a multiple of 32 >= pieces[count - 1].end.
// pixel_rows (channels_last output): column c of output channel n goes to out[(c - begin) * ld_out + n] instead,
// and stream is ignored (a pixel's channels are stored 8 at a time, never whole cache lines).
int64_t planar_corrections_len(int64_t n);
void planar_corrections(const int8_t* rows, int64_t ld_w, int64_t n_begin, int64_t n_end, int32_t* corrections);
void planar_a8(const int8_t* rows, int64_t ld_w, const WeightView& w, const int32_t* corrections, const int8_t* x,
               int64_t ld_x, const PlanarPiece* pieces, int64_t count, const float* bias, int64_t ld_out,
               bool stream, bool pixel_rows = false);
}  // namespace avx512
namespace avx2 {
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, bool stream);
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale);
}  // namespace avx2
namespace amx {
// Runs avx512::linear_a8 where amx_usable() is false.
void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, bool stream);
int64_t packed_a8_bytes(const WeightView& w);
// The planar product of a stride-1 conv over NCHW activations: out[n][p] = (sum_k W[n][k] * X[k][p]) * scale[n]
// * x_scale + bias[n] for every n and p_begin <= p < p_end, NaN throughout for a non-finite x_scale. W is w (one
// scale group per row, K = cin x taps stored in (cin, kh, kw) order) as planar_rows lays it out: int8 rows of
// ld_w = planar_row_bytes bytes, K in (tap, cin rounded up to 4) order, zero past cin and past the taps, rows to a
// multiple of 32. X: int32 words [ld_w / 4][ld_x], byte j of word (q, p) the code of row 4q + j of that K at
// output pixel p (ConvKernels::quantize_quads, for 1x1), ld_x a multiple of 32 >= p_end, zero past the taps.
// stream: write whole aligned vectors around the caches.
int64_t planar_row_bytes(const WeightView& w, int64_t taps);
int64_t planar_rows_bytes(const WeightView& w, int64_t taps);
void planar_rows(const WeightView& w, int64_t taps, int8_t* rows);
void planar_a8(const int8_t* rows, int64_t ld_w, const WeightView& w, const int8_t* x, int64_t ld_x, float x_scale,
               const float* bias, float* out, int64_t ld_out, int64_t p_begin, int64_t p_end, bool stream);
void pack_a8(const WeightView& w, int64_t n_begin, int64_t n_end, int8_t* packed);
void linear_a8_packed(const WeightView& w, const int8_t* packed, const int8_t* xq, const float* x_scale, int64_t m,
                      const float* bias, float* y, int64_t n_begin, int64_t n_end, bool stream);
}  // namespace amx
}  // namespace qk
