// Every ISA table this CPU supports against the scalar reference, over ragged shapes, M = 1 and larger,
// int4 symmetric/asymmetric and int8, every group size and per channel, with and without bias.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "kernels.h"
#include "linear_f32.h"
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

// Float -> float16 / bfloat16 bits for values these types hold exactly (normal range or zero), written apart
// from the kernels' decoders so that a wrong decoder cannot agree with its own encoding.
uint16_t exact_half(float f) {
  if (f == 0.0f) return std::signbit(f) ? 0x8000 : 0;
  int e;
  const float m = std::frexp(std::fabs(f), &e);  // |f| = m * 2^e, m in [0.5, 1)
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  return static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | static_cast<uint16_t>((2 * m - 1) * 1024));
}
uint16_t exact_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

// Activations of one element type: the encoded rows the kernel reads and the float values they hold.
// Values are multiples of 1/64 (float16, |x| < 32) or 1/16 (bfloat16, |x| < 8): exact in the type.
struct Activations {
  qk::ActType type;
  std::vector<float> values;
  std::vector<uint16_t> encoded;
  const void* data() const { return type == qk::ActType::f32 ? static_cast<const void*>(values.data()) : encoded.data(); }
};

Activations make_activations(std::mt19937& rng, qk::ActType type, int64_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Activations a{type, std::vector<float>(count), {}};
  for (auto& value : a.values) {
    value = normal(rng);
    if (type == qk::ActType::f16) value = std::nearbyint(std::clamp(value, -4.0f, 4.0f) * 64) / 64;
    if (type == qk::ActType::bf16) value = std::nearbyint(std::clamp(value, -4.0f, 4.0f) * 16) / 16;
  }
  if (type != qk::ActType::f32)
    for (float value : a.values) a.encoded.push_back(type == qk::ActType::f16 ? exact_half(value) : exact_bf16(value));
  return a;
}

const char* act_name(qk::ActType t) { return t == qk::ActType::f32 ? "f32" : t == qk::ActType::bf16 ? "bf16" : "f16"; }

// The weight-only kernel reads x in every activation type; the int8-activation kernels read float32 x.
void check_linear(qk::Isa isa, std::mt19937& rng, int bits, bool symmetric, int64_t m, int64_t n, int64_t k,
                  int64_t group_size, bool with_bias, qk::ActType x_type = qk::ActType::f32) {
  const auto& kern = qk::kernels(isa);
  qk_test::StoredWeight w = qk_test::make_weight(rng, bits, symmetric, n, k, group_size);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const Activations act = make_activations(rng, x_type, m * k);
  const std::vector<float>& x = act.values;
  std::vector<float> bias(n);
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
  kern.linear_f32(w.view, act.data(), x_type, m, b, got.data(), 0, n / 2);
  kern.linear_f32(w.view, act.data(), x_type, m, b, got.data(), n / 2, n);
  for (int64_t i = 0; i < m * n; ++i)
    CHECK(std::fabs(got[i] - want[i]) <= 1e-5 * bound[i] + 1e-30,
          "%s x=%s bits=%d sym=%d m=%ld n=%ld k=%ld g=%ld i=%ld: %g vs %g", kern.name, act_name(x_type), bits,
          symmetric, (long)m, (long)n, (long)k, (long)group_size, (long)i, got[i], want[i]);
  if (x_type != qk::ActType::f32) return;

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
  qk::ref::linear_a8(w.view, x.data(), m, b, want.data());
  // Streamed (a conv's output): whole vectors of rows that start on a cache line go around the caches, the rest
  // are stored as usual. The output starts on a line, so that both kinds occur.
  std::vector<float> lines(m * n + 16);
  float* y = lines.data() + (64 - reinterpret_cast<uintptr_t>(lines.data()) % 64) % 64 / sizeof(float);
  for (const bool stream : {false, true}) {
    std::fill(y, y + m * n, nan);
    kern.linear_a8(w.view, xq.data(), xs.data(), m, b, y, 0, n, stream);
    for (int64_t i = 0; i < m * n; ++i)
      CHECK(std::fabs(y[i] - want[i]) <= 2e-5 * bound[i] + 1e-30,
            "%s a8 stream=%d bits=%d sym=%d m=%ld n=%ld k=%ld g=%ld i=%ld: %g vs %g", kern.name, stream, bits,
            symmetric, (long)m, (long)n, (long)k, (long)group_size, (long)i, y[i], want[i]);
  }
}

// Integer exactness of linear_a8: with unit scales every partial sum is an integer below 2^24, so the float output
// must equal the exact integer sum of (code - zero) * xq. Codes and zero points are drawn uniformly (int8 codes
// include -128, int4 pad columns hold codes other than the zero point), activations over -127..127.
void check_integer_sums(qk::Isa isa, std::mt19937& rng, int bits, bool symmetric, int64_t m, int64_t n, int64_t k,
                        int64_t group_size) {
  const auto& kern = qk::kernels(isa);
  qk::WeightView v;
  v.bits = bits;
  v.n = n;
  v.k = k;
  v.group_len = qk::group_len_for(bits, k, group_size);
  v.k_pad = qk::padded_k(bits, k, group_size);
  std::vector<uint8_t> qdata(n * v.row_bytes()), zero(symmetric ? 0 : n * v.n_groups());
  std::vector<float> scale(n * v.n_groups(), 1.0f);
  for (auto& byte : qdata) byte = static_cast<uint8_t>(rng());
  for (auto& z : zero) z = static_cast<uint8_t>(rng() % 16);
  v.qdata = qdata.data();
  v.scale = scale.data();
  v.zero_point = symmetric ? nullptr : zero.data();
  std::vector<int8_t> xq(m * v.k_pad, 0);
  std::uniform_int_distribution<int> act(-127, 127);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) xq[r * v.k_pad + i] = static_cast<int8_t>(act(rng));
  std::vector<float> ones(m, 1.0f), got(m * n, std::numeric_limits<float>::quiet_NaN());
  kern.linear_a8(v, xq.data(), ones.data(), m, nullptr, got.data(), 0, n, false);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      int64_t want = 0;
      for (int64_t i = 0; i < k; ++i) want += (v.code(c, i) - v.zero(c, i / v.group_len)) * xq[r * v.k_pad + i];
      CHECK(got[r * n + c] == static_cast<float>(want), "%s integer sum bits=%d sym=%d m=%ld n=%ld k=%ld g=%ld (%ld, %ld): %.1f vs %ld",
            kern.name, bits, symmetric, (long)m, (long)n, (long)k, (long)group_size, (long)r, (long)c, got[r * n + c],
            (long)want);
    }
}

// quantize_rows on rows built to hit the edges: ties (x / s exactly half-way), signed zeros, subnormals, the
// largest floats, NaN and +-Inf in the middle and at the tail of a row. Scales must match bit for bit.
void check_quantize_special_rows(qk::Isa isa) {
  const auto& kern = qk::kernels(isa);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float tiny = std::numeric_limits<float>::denorm_min(), big = std::numeric_limits<float>::max();
  const int64_t k = 37, k_pad = 64;
  std::vector<std::vector<float>> rows;
  auto base = [&] {
    std::vector<float> row(k);
    for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(i % 9) - 4.5f;  // ties once scaled by 127 / 127
    row[3] = 127.0f;                                                             // scale exactly 1
    return row;
  };
  rows.push_back(base());
  rows.push_back(std::vector<float>(k, 0.0f));
  rows.push_back(std::vector<float>(k, -0.0f));
  rows.push_back(std::vector<float>(k, tiny));
  rows.push_back(std::vector<float>(k, -big));
  for (float special : {nan, inf, -inf})
    for (int64_t at : {int64_t{5}, k - 1}) {
      rows.push_back(base());
      rows.back()[at] = special;
    }
  const int64_t m = static_cast<int64_t>(rows.size());
  std::vector<float> x;
  for (const auto& row : rows) x.insert(x.end(), row.begin(), row.end());
  std::vector<int8_t> xq(m * k_pad, 77), want(k_pad);
  std::vector<float> xs(m);
  kern.quantize_rows(x.data(), m, k, k_pad, xq.data(), xs.data());
  for (int64_t r = 0; r < m; ++r) {
    const float s = qk::ref::quantize_activation_row(x.data() + r * k, k, k_pad, want.data());
    CHECK(std::memcmp(&s, &xs[r], sizeof(float)) == 0, "%s quantize special row %ld: scale %g vs %g", kern.name,
          (long)r, xs[r], s);
    CHECK(std::memcmp(want.data(), xq.data() + r * k_pad, k_pad) == 0, "%s quantize special row %ld: codes differ",
          kern.name, (long)r);
  }
}

// dequantize_rows of rows [n0, n1) bit for bit against the reference, into a buffer of exactly the rows' size
// (the sanitizer build catches a write past it).
void check_dequantize_rows(qk::Isa isa, std::mt19937& rng, int bits, bool symmetric, int64_t n, int64_t k,
                           int64_t group_size) {
  const auto w = qk_test::make_weight(rng, bits, symmetric, n, k, group_size);
  const int64_t n0 = n / 3, n1 = n;
  std::vector<float> got((n1 - n0) * k, std::numeric_limits<float>::quiet_NaN()), want(k);
  qk::kernels(isa).dequantize_rows(w.view, n0, n1, got.data());
  for (int64_t r = n0; r < n1; ++r) {
    qk::ref::dequantize_row(w.view, r, want.data());
    CHECK(std::memcmp(want.data(), got.data() + (r - n0) * k, k * sizeof(float)) == 0,
          "%s dequantize_rows bits=%d sym=%d n=%ld k=%ld g=%ld: row %ld differs", qk::kernels(isa).name, bits,
          symmetric, (long)n, (long)k, (long)group_size, (long)r);
  }
}

}  // namespace

// The float16 decoder against the definition, for every bit pattern.
void check_half_to_float() {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const int e = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    const float got = qk::half_to_float(static_cast<uint16_t>(h));
    if (e == 0x1F) {
      CHECK(mantissa ? std::isnan(got) : got == sign * std::numeric_limits<float>::infinity(), "half %04x", h);
      continue;
    }
    const float want = sign * (e == 0 ? std::ldexp(static_cast<float>(mantissa), -24)
                                      : std::ldexp(static_cast<float>(1024 + mantissa), e - 25));
    CHECK(got == want && std::signbit(got) == std::signbit(want), "half %04x: %g vs %g", h, got, want);
  }
}

int main() {
  std::mt19937 rng(1234);
  check_half_to_float();
  const int64_t group_sizes[] = {0, 32, 64, 128, 256};
  for (int bits : {4, 8})
    for (bool symmetric : {true, false}) {
      if (bits == 8 && !symmetric) continue;
      for (int64_t g : group_sizes)
        for (int64_t k : {1, 3, 31, 64, 100, 257, 513, 1000}) check_round_trip(rng, bits, symmetric, k, g);
    }

  for (qk::Isa isa : {qk::Isa::portable, qk::Isa::avx2, qk::Isa::avx512, qk::Isa::amx}) {
    if (!qk::isa_supported(isa)) {
      std::printf("skipping %s: not supported by this CPU\n", qk::isa_name(isa));
      continue;
    }
    for (int bits : {4, 8})
      for (bool symmetric : {true, false}) {
        if (bits == 8 && !symmetric) continue;
        for (int64_t g : group_sizes) {
          // N and K off every block size: odd K, K past a whole 64-byte int4 block by a few bytes, N not a
          // multiple of the 16-row tile nor of the rows per pass.
          for (int64_t m : {1, 3, 8, 33})
            for (auto nk : {std::pair<int64_t, int64_t>{1, 1}, {17, 33}, {33, 64}, {64, 300}, {37, 513}, {48, 1000},
                            {19, 129}, {21, 134}, {6, 255}})
              check_linear(isa, rng, bits, symmetric, m, nk.first, nk.second, g, (m + nk.first) % 2 == 0);
          // Every number of activation rows per weight pass (1..8), and 9 (a pass of 8 and a pass of 1).
          for (int64_t m : {2, 4, 5, 6, 7, 9})
            check_linear(isa, rng, bits, symmetric, m, 23, 391, g, m % 2 == 0);
          // bfloat16 and float16 activations, read by the kernels without a float copy; from 2 (bf16) or 3
          // (f16) rows the amx table runs them on tiles, 16 columns (bf16 rows, or f16 rows x 2) per pass.
          for (qk::ActType t : {qk::ActType::bf16, qk::ActType::f16})
            for (int64_t m : {1, 2, 3, 17})
              check_linear(isa, rng, bits, symmetric, m, 20, 300, g, true, t);
          // More rows than one staging pass holds: K > 2048 allows fewer than 33 staged rows on the FMA
          // kernels; the tile path stages 256 rows at a time.
          for (qk::ActType t : {qk::ActType::f32, qk::ActType::bf16})
            check_linear(isa, rng, bits, symmetric, 33, 3, 2100, g, false, t);
          check_linear(isa, rng, bits, symmetric, 257, 3, 130, g, true, qk::ActType::bf16);
          // Tall inputs (a second row chunk of the a8 kernels past 256 rows), K over several 512-element blocks.
          check_linear(isa, rng, bits, symmetric, 130, 21, 1100, g, true);
          check_linear(isa, rng, bits, symmetric, 270, 5, 200, g, false);
          // Row blocks of the AMX a8 kernel sharing one packing, activations read in place (K a multiple of 64),
          // and a partial last pass of 12 rows.
          check_linear(isa, rng, bits, symmetric, 556, 40, 512, g, true);
          for (int64_t m : {1, 7, 130})
            for (auto nk : {std::pair<int64_t, int64_t>{1, 1}, {45, 7}, {33, 100}, {19, 515}, {5, 1000}})
              check_integer_sums(isa, rng, bits, symmetric, m, nk.first, nk.second, g);
          for (auto nk : {std::pair<int64_t, int64_t>{1, 1}, {4, 31}, {7, 257}, {5, 1000}, {3, 1101}})
            check_dequantize_rows(isa, rng, bits, symmetric, nk.first, nk.second, g);
        }
      }
    check_quantize_special_rows(isa);
    std::printf("%s: checked\n", qk::isa_name(isa));
  }
  return TEST_MAIN_RESULT("test_linear");
}
