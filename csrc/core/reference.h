// The spec written as code: scalar, obviously correct, slow. Every optimized kernel is tested against these.
#pragma once

#include <cstdint>

#include "conv2d.h"
#include "formats.h"

namespace qk::ref {

// Quantizes one row of k floats into the stored format (see formats.h). `qdata_row` has row_bytes() bytes,
// `scale_row` and `zero_row` (asymmetric int4 only, else nullptr) have n_groups entries.
void quantize_row(int bits, bool symmetric, const float* w, int64_t k, int64_t k_pad, int64_t group_len,
                  void* qdata_row, float* scale_row, uint8_t* zero_row);

// Dequantizes row `row` of `w` into k floats.
void dequantize_row(const WeightView& w, int64_t row, float* out);

// Dynamic activation quantization of one row: xq has k_pad entries (zero past k). Returns the scale.
float quantize_activation_row(const float* x, int64_t k, int64_t k_pad, int8_t* xq);

// y[m][n] = sum_k x[m][k] * W[n][k] + bias[n], accumulated in double. bias may be nullptr.
void linear(const WeightView& w, const float* x, int64_t m, const float* bias, double* y);

// The same with x quantized per row first (the *_a8 ops).
void linear_a8(const WeightView& w, const float* x, int64_t m, const float* bias, double* y);

// The activations a conv multiplies, in double: x itself, or with quantize_input each image (all its channels)
// quantized as one row, codes times scale (NaN throughout for an image holding NaN or Inf). x and xd are NCHW.
void conv2d_activations(const Conv2dShape& s, const float* x, bool quantize_input, double* xd);

// Direct convolution in double of x NCHW with w [out_channels][k], K in (cin, kh, kw) order; bias may be nullptr.
// y: [batch][out_channels][out_h][out_w].
void conv2d_dense(const Conv2dShape& s, const double* x, const double* w, const double* bias, double* y);

// The quantized conv: conv2d_dense of conv2d_activations and the dequantized stored weight.
void conv2d(const Conv2dShape& s, const float* x, const WeightView& w, const float* bias, bool quantize_input,
            double* y);

}  // namespace qk::ref
