// A random weight in the stored format, quantized by the reference, shared by the native tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "formats.h"
#include "reference.h"

namespace qk_test {

struct StoredWeight {
  std::vector<uint8_t> qdata;
  std::vector<float> scale;
  std::vector<uint8_t> zero;
  qk::WeightView view;
};

inline StoredWeight make_weight(std::mt19937& rng, int bits, bool symmetric, int64_t n, int64_t k, int64_t group_size) {
  StoredWeight s;
  qk::WeightView& v = s.view;
  v.bits = bits;
  v.n = n;
  v.k = k;
  v.group_len = qk::group_len_for(bits, k, group_size);
  v.k_pad = qk::padded_k(bits, k, group_size);
  s.qdata.resize(n * v.row_bytes());
  s.scale.resize(n * v.n_groups());
  if (!symmetric) s.zero.resize(n * v.n_groups());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> row(k);
  for (int64_t r = 0; r < n; ++r) {
    for (auto& value : row) value = normal(rng);
    if (r == 0) std::fill(row.begin(), row.end(), 0.0f);  // an all-zero row must not divide by zero
    qk::ref::quantize_row(bits, symmetric, row.data(), k, v.k_pad, v.group_len, s.qdata.data() + r * v.row_bytes(),
                          s.scale.data() + r * v.n_groups(), symmetric ? nullptr : s.zero.data() + r * v.n_groups());
  }
  v.qdata = s.qdata.data();
  v.scale = s.scale.data();
  v.zero_point = symmetric ? nullptr : s.zero.data();
  return s;
}

}  // namespace qk_test
