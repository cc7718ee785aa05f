// Rows of a stored weight dequantized to float32, W[n][k] = (code - zero) * scale: the decode behind the
// dequantize_rows slot of each ISA table (kernels.h). Plain loops, written so that the compiler vectorizes them;
// each ISA's source includes this header after its target pragma, so each gets its own vector width. Internal
// linkage (unnamed namespace): the copies differ per ISA, and the linker must not pick one for all.
#pragma once

#include <algorithm>
#include <cstdint>

#include "formats.h"

namespace qk {
namespace {

void dequantize_rows_loop(const WeightView& w, int64_t n_begin, int64_t n_end, float* out) {
  const int64_t n_groups = w.n_groups();
  for (int64_t n = n_begin; n < n_end; ++n) {
    float* row_out = out + (n - n_begin) * w.k;
    const float* scale = w.scale + n * n_groups;
    for (int64_t g = 0; g < n_groups && g * w.group_len < w.k; ++g) {
      const int64_t begin = g * w.group_len, end = std::min(begin + w.group_len, w.k);
      const float s = scale[g];
      if (w.bits == 8) {
        const int8_t* q = static_cast<const int8_t*>(w.qdata) + n * w.k_pad;
        for (int64_t i = begin; i < end; ++i) row_out[i] = static_cast<float>(q[i]) * s;
        continue;
      }
      // group_len is even for int4, so a group starts on a byte; an odd k ends inside the last byte.
      const uint8_t* q = static_cast<const uint8_t*>(w.qdata) + n * (w.k_pad / 2) + begin / 2;
      const float zero = static_cast<float>(w.zero(n, g));
      float* o = row_out + begin;
      const int64_t pairs = (end - begin) / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        o[2 * j] = (static_cast<float>(q[j] & 0xF) - zero) * s;
        o[2 * j + 1] = (static_cast<float>(q[j] >> 4) - zero) * s;
      }
      if (begin + 2 * pairs < end) o[2 * pairs] = (static_cast<float>(q[pairs] & 0xF) - zero) * s;
    }
  }
}

}  // namespace
}  // namespace qk
