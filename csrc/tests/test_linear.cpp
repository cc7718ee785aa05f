// Every ISA table this CPU supports against the scalar reference, over ragged shapes, M = 1 and larger,
// int4 symmetric/asymmetric and int8, every group size and per channel, with and without bias.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "kernels.h"
#include "reference.h"
#include "stored_weight.h"

namespace {

// Round trip: every element within half a step of the original (checked on the reference quantizer itself).
void check_round_trip(std::mt19937& rng, int bits, bool symmetric, int64_t k, int64_t group_size) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> row(k), back(k);
  for (auto& value : row) value = normal(rng);
  const int64_t g = qk::group_len_for(bits, k, group_size), k_pad = qk::padded_k(bits, k, group_size);
  std::vector<uint8_t> q(k_pad);
  std::vector<float> scale(k_pad / g);
  std::vector<uint8_t> zero(k_pad / g);
  qk::ref::quantize_row(bits, symmetric, row.data(), k, k_pad, g, q.data(), scale.data(),
                        symmetric ? nullptr : zero.data());
  qk::WeightView v;
  v.bits = bits;
  v.qdata = q.data();
  v.scale = scale.data();
  v.zero_point = symmetric ? nullptr : zero.data();
  v.n = 1;
  v.k = k;
  v.k_pad = k_pad;
  v.group_len = g;
  qk::ref::dequantize_row(v, 0, back.data());
  for (int64_t i = 0; i < k; ++i) {
    const float step = scale[i / g];
    CHECK(std::fabs(back[i] - row[i]) <= 0.5f * step * (1 + 1e-5f) + 1e-12f,
          "bits=%d sym=%d k=%ld g=%ld i=%ld: %g vs %g (step %g)", bits, symmetric, (long)k, (long)group_size,
          (long)i, back[i], row[i], step);
  }
}

void check_linear(qk::Isa isa, std::mt19937& rng, int bits, bool symmetric, int64_t m, int64_t n, int64_t k,
                  int64_t group_size, bool with_bias) {
  const auto& kern = qk::kernels(isa);
  qk_test::StoredWeight w = qk_test::make_weight(rng, bits, symmetric, n, k, group_size);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(m * k), bias(n);
  for (auto& value : x) value = normal(rng);
  for (auto& value : bias) value = normal(rng);
  const float* b = with_bias ? bias.data() : nullptr;

  // |x| @ |W|^T bounds the accumulation error of any summation order.
  std::vector<float> abs_x(m * k);
  for (int64_t i = 0; i < m * k; ++i) abs_x[i] = std::fabs(x[i]);
  std::vector<double> bound(m * n);
  {
    std::vector<float> wrow(k);
    for (int64_t c = 0; c < n; ++c) {
      qk::ref::dequantize_row(w.view, c, wrow.data());
      for (int64_t r = 0; r < m; ++r) {
        double acc = 0;
        for (int64_t i = 0; i < k; ++i) acc += std::fabs(wrow[i]) * abs_x[r * k + i];
        bound[r * n + c] = acc + (b ? std::fabs(b[c]) : 0.0);
      }
    }
  }

  std::vector<double> want(m * n);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Weight-only, split into two row ranges as the binding's threads would.
  std::vector<float> got(m * n, nan);
  qk::ref::linear(w.view, x.data(), m, b, want.data());
  kern.linear_f32(w.view, x.data(), m, b, got.data(), 0, n / 2);
  kern.linear_f32(w.view, x.data(), m, b, got.data(), n / 2, n);
  for (int64_t i = 0; i < m * n; ++i)
    CHECK(std::fabs(got[i] - want[i]) <= 1e-5 * bound[i] + 1e-30, "%s f32 bits=%d sym=%d m=%ld n=%ld k=%ld g=%ld i=%ld: %g vs %g",
          kern.name, bits, symmetric, (long)m, (long)n, (long)k, (long)group_size, (long)i, got[i], want[i]);

  // Dynamic int8 activations: the integers must match the reference exactly; only float sums may differ.
  std::vector<int8_t> xq(m * w.view.k_pad, 77), xq_ref(w.view.k_pad);
  std::vector<float> xs(m, nan);
  kern.quantize_rows(x.data(), m, k, w.view.k_pad, xq.data(), xs.data());
  for (int64_t r = 0; r < m; ++r) {
    const float s = qk::ref::quantize_activation_row(x.data() + r * k, k, w.view.k_pad, xq_ref.data());
    CHECK(s == xs[r], "%s quantize_rows scale row %ld: %g vs %g", kern.name, (long)r, xs[r], s);
    for (int64_t i = 0; i < w.view.k_pad; ++i)
      CHECK(xq[r * w.view.k_pad + i] == xq_ref[i], "%s quantize_rows row %ld col %ld", kern.name, (long)r, (long)i);
  }
  std::fill(got.begin(), got.end(), nan);
  qk::ref::linear_a8(w.view, x.data(), m, b, want.data());
  kern.linear_a8(w.view, xq.data(), xs.data(), m, b, got.data(), 0, n);
  for (int64_t i = 0; i < m * n; ++i)
    CHECK(std::fabs(got[i] - want[i]) <= 2e-5 * bound[i] + 1e-30, "%s a8 bits=%d sym=%d m=%ld n=%ld k=%ld g=%ld i=%ld: %g vs %g",
          kern.name, bits, symmetric, (long)m, (long)n, (long)k, (long)group_size, (long)i, got[i], want[i]);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const int64_t group_sizes[] = {0, 32, 64, 128, 256};
  for (int bits : {4, 8})
    for (bool symmetric : {true, false}) {
      if (bits == 8 && !symmetric) continue;
      for (int64_t g : group_sizes)
        for (int64_t k : {1, 3, 31, 64, 100, 257, 513, 1000}) check_round_trip(rng, bits, symmetric, k, g);
    }

  for (qk::Isa isa : {qk::Isa::portable, qk::Isa::avx2, qk::Isa::avx512}) {
    if (!qk::isa_supported(isa)) {
      std::printf("skipping %s: not supported by this CPU\n", qk::isa_name(isa));
      continue;
    }
    for (int bits : {4, 8})
      for (bool symmetric : {true, false}) {
        if (bits == 8 && !symmetric) continue;
        for (int64_t g : group_sizes)
          for (int64_t m : {1, 3, 8, 33})
            for (auto nk : {std::pair<int64_t, int64_t>{1, 1}, {17, 33}, {33, 64}, {64, 300}, {37, 513}, {48, 1000}})
              check_linear(isa, rng, bits, symmetric, m, nk.first, nk.second, g, (m + nk.first) % 2 == 0);
      }
    std::printf("%s: checked\n", qk::isa_name(isa));
  }
  return TEST_MAIN_RESULT("test_linear");
}
