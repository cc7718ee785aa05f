// Portable scalar kernels: the path for CPUs without AVX2, and the baseline the SIMD paths must match.
#include <algorithm>
#include <cmath>
#include <limits>

#include "dequantize_rows.h"
#include "kernels.h"
#include "linear_f32.h"
#include "reference.h"

namespace qk {
namespace {

// Weights are decoded in chunks that never cross a group boundary. 256 is the largest group size, so a
// chunk is a whole group except for per-channel groups, which are cut into 256-element pieces.
constexpr int64_t kChunk = 256;
// Activation rows sharing one decoded chunk.
constexpr int64_t kRowBlock = 8;

// Writes codes minus zero point of row n, columns [col, col + len) into out.
void decode_chunk(const WeightView& w, int64_t n, int64_t col, int64_t len, int zero, int32_t* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = w.code(n, col + i) - zero;
}

void linear_f32(const WeightView& w, const void* x_any, ActType x_type, int64_t m, const float* bias, float* y,
                int64_t n_begin, int64_t n_end) {
  float* x = staging_buffer(0, m * w.k);
  for (int64_t i = 0; i < m * w.k; ++i) x[i] = act_value(x_any, x_type, i);
  int32_t codes[kChunk];
  float values[kChunk];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, m - r0);
      float acc[kRowBlock] = {};
      for (int64_t col = 0, len = 0; col < w.k; col += len) {
        const int64_t g = col / w.group_len;
        len = std::min({kChunk, (g + 1) * w.group_len - col, w.k - col});
        decode_chunk(w, n, col, len, w.zero(n, g), codes);
        for (int64_t i = 0; i < len; ++i) values[i] = static_cast<float>(codes[i]);
        const float scale = w.scale[n * w.n_groups() + g];
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = x + (r0 + r) * w.k + col;
          float dot = 0.0f;
          for (int64_t i = 0; i < len; ++i) dot += values[i] * xr[i];
          acc[r] += dot * scale;
        }
      }
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * w.n + n] = acc[r] + (bias ? bias[n] : 0.0f);
    }
  }
}

void linear_a8(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias, float* y,
               int64_t n_begin, int64_t n_end, [[maybe_unused]] bool stream) {
  int32_t codes[kChunk];
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, m - r0);
      float acc[kRowBlock] = {};
      for (int64_t col = 0, len = 0; col < w.k_pad; col += len) {
        const int64_t g = col / w.group_len;
        len = std::min(kChunk, (g + 1) * w.group_len - col);
        decode_chunk(w, n, col, len, w.zero(n, g), codes);
        const float scale = w.scale[n * w.n_groups() + g];
        for (int64_t r = 0; r < rows; ++r) {
          const int8_t* xr = xq + (r0 + r) * w.k_pad + col;
          int32_t dot = 0;  // |dot| <= 256 * 15 * 127: no overflow
          for (int64_t i = 0; i < len; ++i) dot += codes[i] * xr[i];
          acc[r] += static_cast<float>(dot) * scale;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float s = x_scale[r0 + r];
        y[(r0 + r) * w.n + n] = std::isfinite(s) ? acc[r] * s + (bias ? bias[n] : 0.0f)
                                                 : std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale) {
  for (int64_t r = 0; r < m; ++r) x_scale[r] = ref::quantize_activation_row(x + r * k, k, k_pad, xq + r * k_pad);
}

void dequantize_rows(const WeightView& w, int64_t n_begin, int64_t n_end, float* out) {
  dequantize_rows_loop(w, n_begin, n_end, out);
}

}  // namespace

const LinearKernels& portable_kernels() {
  static const LinearKernels table{"portable", linear_f32, linear_a8, quantize_rows, dequantize_rows};
  return table;
}

}  // namespace qk
