#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace qk::ref {

void quantize_row(int bits, bool symmetric, const float* w, int64_t k, int64_t k_pad, int64_t group_len,
                  void* qdata_row, float* scale_row, uint8_t* zero_row) {
  auto at = [&](int64_t i) { return i < k ? w[i] : 0.0f; };
  std::vector<int> codes(k_pad);
  for (int64_t g = 0; g < k_pad / group_len; ++g) {
    const int64_t begin = g * group_len, end = begin + group_len;
    float lo = 0.0f, hi = 0.0f, absmax = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      lo = std::min(lo, at(i));
      hi = std::max(hi, at(i));
      absmax = std::max(absmax, std::fabs(at(i)));
    }
    float scale;
    int zero;
    int qmin, qmax;
    if (symmetric) {
      const int q = bits == 8 ? kInt8QMax : kInt4SymmetricQMax;
      scale = absmax / static_cast<float>(q);
      zero = bits == 8 ? 0 : kInt4SymmetricZero;
      qmin = zero - q;
      qmax = zero + q;
    } else {
      scale = (hi - lo) / static_cast<float>(kInt4CodeMax);
      zero = scale > 0 ? static_cast<int>(std::clamp(std::nearbyint(-lo / scale), 0.0f, 15.0f)) : 0;
      qmin = 0;
      qmax = kInt4CodeMax;
    }
    for (int64_t i = begin; i < end; ++i) {
      const float q = scale > 0 ? std::nearbyint(at(i) / scale) : 0.0f;
      codes[i] = std::clamp(static_cast<int>(q) + zero, qmin, qmax);
    }
    scale_row[g] = scale;
    if (zero_row) zero_row[g] = static_cast<uint8_t>(zero);
  }
  if (bits == 8) {
    auto* out = static_cast<int8_t*>(qdata_row);
    for (int64_t i = 0; i < k_pad; ++i) out[i] = static_cast<int8_t>(codes[i]);
  } else {
    auto* out = static_cast<uint8_t*>(qdata_row);
    for (int64_t j = 0; j < k_pad / 2; ++j) out[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
  }
}

void dequantize_row(const WeightView& w, int64_t row, float* out) {
  for (int64_t i = 0; i < w.k; ++i) {
    const int64_t g = i / w.group_len;
    out[i] = static_cast<float>(w.code(row, i) - w.zero(row, g)) * w.scale[row * w.n_groups() + g];
  }
}

float quantize_activation_row(const float* x, int64_t k, int64_t k_pad, int8_t* xq) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  for (int64_t i = 0; i < k; ++i) absmax = std::isnan(x[i]) ? x[i] : absmax;
  const float scale = absmax / static_cast<float>(kActInt8QMax);
  const bool usable = std::isfinite(scale) && scale > 0;
  for (int64_t i = 0; i < k_pad; ++i)
    xq[i] = (usable && i < k) ? static_cast<int8_t>(std::nearbyint(x[i] / scale)) : 0;
  return scale;
}

void linear(const WeightView& w, const float* x, int64_t m, const float* bias, double* y) {
  std::vector<float> wrow(w.k);
  for (int64_t n = 0; n < w.n; ++n) {
    dequantize_row(w, n, wrow.data());
    for (int64_t r = 0; r < m; ++r) {
      double acc = bias ? bias[n] : 0.0;
      for (int64_t i = 0; i < w.k; ++i) acc += static_cast<double>(x[r * w.k + i]) * wrow[i];
      y[r * w.n + n] = acc;
    }
  }
}

void linear_a8(const WeightView& w, const float* x, int64_t m, const float* bias, double* y) {
  std::vector<float> xdq(m * w.k);
  std::vector<int8_t> xq(w.k_pad);
  for (int64_t r = 0; r < m; ++r) {
    const float s = quantize_activation_row(x + r * w.k, w.k, w.k_pad, xq.data());
    const bool finite = std::isfinite(s);
    for (int64_t i = 0; i < w.k; ++i)
      xdq[r * w.k + i] = finite ? xq[i] * s : std::numeric_limits<float>::quiet_NaN();
  }
  linear(w, xdq.data(), m, bias, y);
}

void conv2d_activations(const Conv2dShape& s, const float* x, bool quantize_input, double* xd) {
  const int64_t image = s.in_channels * s.height * s.width;
  std::vector<int8_t> xq(image);
  for (int64_t b = 0; b < s.batch; ++b) {
    const float* xb = x + b * image;
    double* out = xd + b * image;
    if (!quantize_input) {
      for (int64_t i = 0; i < image; ++i) out[i] = xb[i];
      continue;
    }
    const float scale = quantize_activation_row(xb, image, image, xq.data());
    for (int64_t i = 0; i < image; ++i)
      out[i] = std::isfinite(scale) ? xq[i] * static_cast<double>(scale) : std::numeric_limits<double>::quiet_NaN();
  }
}

void conv2d_dense(const Conv2dShape& s, const double* x, const double* w, const double* bias, double* y) {
  const int64_t OH = s.out_height(), OW = s.out_width(), cg = s.group_in();
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t co = 0; co < s.out_channels; ++co) {
      const int64_t g = co / s.group_out();
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double acc = bias ? bias[co] : 0.0;
          for (int64_t ci = 0; ci < cg; ++ci)
            for (int64_t kh = 0; kh < s.kernel_h; ++kh)
              for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
                const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
                const int64_t iw = ow * s.stride_w - s.pad_w + kw * s.dilation_w;
                if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) continue;
                acc += x[((b * s.in_channels + g * cg + ci) * s.height + ih) * s.width + iw] *
                       w[co * s.k() + (ci * s.kernel_h + kh) * s.kernel_w + kw];
              }
          y[((b * s.out_channels + co) * OH + oh) * OW + ow] = acc;
        }
    }
}

void conv2d(const Conv2dShape& s, const float* x, const WeightView& w, const float* bias, bool quantize_input,
            double* y) {
  std::vector<double> xd(s.batch * s.in_channels * s.height * s.width), wd(w.n * w.k), bd(s.out_channels);
  conv2d_activations(s, x, quantize_input, xd.data());
  std::vector<float> row(w.k);
  for (int64_t n = 0; n < w.n; ++n) {
    dequantize_row(w, n, row.data());
    std::copy(row.begin(), row.end(), wd.begin() + n * w.k);
  }
  if (bias) std::copy(bias, bias + s.out_channels, bd.begin());
  conv2d_dense(s, xd.data(), wd.data(), bias ? bd.data() : nullptr, y);
}

}  // namespace qk::ref
