// qk::conv2d on every ISA this CPU supports against the double reference (ref::conv2d): every path (depthwise,
// direct 1x1, im2col with the weight reordered or gathered), both layouts, int8/int4 weights, weight-only and
// dynamic int8 activations, threads that take bands or split the output channels. Also the per-ISA building
// blocks on ragged sizes: absmax (NaN aware), the quantizers (exactly nearbyint, into bytes, floats, transposed
// and into quads of channels), one tap's shifted words and the transpose.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "conv2d.h"
#include "reference.h"
#include "stored_weight.h"

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Runs `threads` chunks one after another: the decomposition of a parallel run, deterministic.
qk::Parallel chunked(int64_t threads) {
  qk::Parallel p;
  p.num_threads = threads;
  p.for_range = [threads](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    for (int64_t t = 0; t < threads; ++t) {
      const int64_t begin = n * t / threads, end = n * (t + 1) / threads;
      if (begin < end) body(begin, end);
    }
  };
  return p;
}

// Both quantizers give exactly nearbyint(x / scale) (a float32 division) on x.
void check_quantizers(const qk::ConvKernels& ck, const std::vector<float>& x, float scale) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<int8_t> q8(n, 99);
  std::vector<float> qf(n, kNaN);
  ck.quantize_int8(x.data(), n, scale, q8.data());
  ck.quantize_f32(x.data(), n, scale, qf.data());
  for (int64_t i = 0; i < n; ++i) {
    const float want_q = std::nearbyint(x[i] / scale);
    CHECK(q8[i] == want_q && qf[i] == want_q, "%s quantize n=%ld scale=%a x=%a: %d / %g vs %g", ck.name, (long)n,
          scale, x[i], q8[i], qf[i], want_q);
  }
}

void check_building_blocks(const qk::ConvKernels& ck, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int64_t n : {1, 5, 16, 17, 100, 1000}) {
    std::vector<float> x(n);
    for (auto& v : x) v = normal(rng);
    float want = 0.0f;
    for (float v : x) want = std::max(want, std::fabs(v));
    CHECK(ck.absmax(x.data(), n) == want, "%s absmax n=%ld", ck.name, (long)n);
    x[n / 2] = -std::numeric_limits<float>::infinity();
    CHECK(std::isinf(ck.absmax(x.data(), n)), "%s absmax with -inf n=%ld", ck.name, (long)n);
    x[n - 1] = kNaN;
    CHECK(std::isnan(ck.absmax(x.data(), n)), "%s absmax with NaN n=%ld", ck.name, (long)n);
    // A NaN with its sign bit set, first (in the vector loop's body); magnitudes only subnormal; only -0.
    for (auto& v : x) v = normal(rng);
    x[0] = -kNaN;
    CHECK(std::isnan(ck.absmax(x.data(), n)), "%s absmax with -NaN first n=%ld", ck.name, (long)n);
    for (int64_t i = 0; i < n; ++i) x[i] = (i % 2 ? -1.0f : 1.0f) * std::numeric_limits<float>::denorm_min() * (i + 1);
    CHECK(ck.absmax(x.data(), n) == std::numeric_limits<float>::denorm_min() * n, "%s absmax subnormal n=%ld",
          ck.name, (long)n);
    std::fill(x.begin(), x.end(), -0.0f);
    const float zero = ck.absmax(x.data(), n);
    CHECK(zero == 0.0f && !std::signbit(zero), "%s absmax of -0 n=%ld", ck.name, (long)n);

    // Codes must equal nearbyint(x / scale) exactly, ties (k + 0.5) included.
    const float scale = 0.25f;
    for (int64_t i = 0; i < n; ++i) x[i] = i % 3 == 0 ? scale * (std::floor(normal(rng)) + 0.5f) : normal(rng);
    for (auto& v : x) v = std::clamp(v, -127 * scale, 127 * scale);
    check_quantizers(ck, x, scale);
  }
  // Scales with inexact reciprocals (the AVX kernels divide by multiplying with one and correcting), and
  // inputs on and next to the rounding ties (k + 0.5) * scale and the integers; a subnormal scale, whose
  // reciprocal overflows; subnormal inputs.
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-80, 80);
  std::vector<float> scales = {1e-40f, 3e-39f, 0x1p-64f, 0x1.fffffep-65f, 0x1p64f};
  for (int i = 0; i < 300; ++i) scales.push_back(std::ldexp(unit(rng), exponent(rng)) / 127.0f);
  for (float scale : scales) {
    std::vector<float> x;
    for (int k = -127; k < 127; k += 3)
      for (float v : {(k + 0.5f) * scale, static_cast<float>(k) * scale})
        for (float w : {v, std::nextafter(v, 1e30f), std::nextafter(v, -1e30f)})
          if (std::fabs(w) <= 127 * scale) x.push_back(w);
    for (float v : {1e-45f, -1e-45f, 1e-39f, 0.0f}) x.push_back(v);
    check_quantizers(ck, x, scale);
  }
  // Subsampled planes: rows one vector wide and past two (the stride-2 vector path), uneven strides.
  for (int64_t width : {1, 5, 16, 33, 70})
    for (auto [sh, sw] : {std::pair<int64_t, int64_t>{1, 1}, {2, 2}, {2, 3}, {3, 1}, {1, 2}}) {
      const int64_t height = 7, out_h = (height - 1) / sh + 1, out_w = (width - 1) / sw + 1;
      std::vector<float> src(height * width), dst(out_h * out_w + 1, kNaN);
      for (auto& v : src) v = normal(rng);
      ck.subsample(src.data(), width, sh, sw, out_h, out_w, dst.data());
      for (int64_t oh = 0; oh < out_h; ++oh)
        for (int64_t ow = 0; ow < out_w; ++ow)
          CHECK(dst[oh * out_w + ow] == src[oh * sh * width + ow * sw],
                "%s subsample width=%ld stride=%ld,%ld at %ld,%ld", ck.name, (long)width, (long)sh, (long)sw,
                (long)oh, (long)ow);
      CHECK(std::isnan(dst.back()), "%s subsample wrote past its output", ck.name);
    }
  // Quads: word (q, p) holds the codes of channels 4q..4q+3 at pixel p, zero past the channels and the pixels;
  // inputs on the rounding ties as above.
  for (int64_t channels : {1, 4, 6, 9})
    for (int64_t pixels : {1, 15, 16, 17, 40}) {
      const int64_t ld_src = pixels + 3, ld_dst = (pixels + 31) / 32 * 32, quads = (channels + 3) / 4 + 1;
      const float scale = 0.0625f;
      std::vector<float> src(channels * ld_src);
      for (int64_t i = 0; i < channels * ld_src; ++i)
        src[i] = std::clamp(i % 3 == 0 ? scale * (std::floor(normal(rng)) + 0.5f) : normal(rng), -127 * scale,
                            127 * scale);
      std::vector<int8_t> words(quads * ld_dst * 4, 99);
      ck.quantize_quads(src.data(), channels, pixels, ld_src, scale, words.data(), ld_dst, 0, quads);
      for (int64_t q = 0; q < quads; ++q)
        for (int64_t p = 0; p < ld_dst; ++p)
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t c = 4 * q + j;
            const float want = c < channels && p < pixels ? std::nearbyint(src[c * ld_src + p] / scale) : 0.0f;
            CHECK(words[(q * ld_dst + p) * 4 + j] == want, "%s quantize_quads %ldx%ld at (%ld, %ld)", ck.name,
                  (long)channels, (long)pixels, (long)c, (long)p);
          }
    }
  // One tap's words of several planes for a range of output pixels: rows as wide as the input's (one shifted run
  // of each plane) and not; widths below and above the vector width; runs longer than the 256 words whose masks
  // are kept at a time.
  for (int64_t height : {1, 5, 40})
    for (int64_t width : {3, 7, 20})
      for (int64_t out_width : {width, width - 2, width + 3})
        for (int64_t dy : {-2, 0, 1})
          for (int64_t dx : {-3, -1, 0, 2}) {
            if (out_width < 1) continue;
            const int64_t quads = 3, ld_src = height * width + 5;
            std::vector<int32_t> src(quads * ld_src);
            for (int64_t i = 0; i < quads * ld_src; ++i) src[i] = static_cast<int32_t>(i * 7919 + 1);
            const int64_t out_height = height + 2, p0 = out_width / 2, len = out_height * out_width - p0 - 1;
            const int64_t ld_dst = len + 19;
            std::vector<int32_t> dst(quads * ld_dst, -1);
            ck.tap_quads(src.data(), quads, ld_src, height, width, out_width, dy, dx, p0, len, dst.data(), ld_dst);
            for (int64_t q = 0; q < quads; ++q)
              for (int64_t j = 0; j < ld_dst; ++j) {
                const int64_t p = p0 + j, ih = p / out_width + dy, iw = p % out_width + dx;
                const bool inside = ih >= 0 && ih < height && iw >= 0 && iw < width;
                const int32_t want = j >= len ? -1 : inside ? src[q * ld_src + ih * width + iw] : 0;
                CHECK(dst[q * ld_dst + j] == want,
                      "%s tap_quads %ldx%ld out_width=%ld shift (%ld, %ld) quad %ld at %ld: %d, want %d", ck.name,
                      (long)height, (long)width, (long)out_width, (long)dy, (long)dx, (long)q, (long)p,
                      dst[q * ld_dst + j], want);
              }
          }
  std::uniform_int_distribution<int> byte(0, 255);
  for (int64_t cin : {1, 15, 16, 17, 40})
    for (int64_t taps : {1, 4, 9, 16, 25, 49}) {
      std::vector<uint8_t> src(cin * taps), dst(cin * taps, 0);
      for (auto& v : src) v = static_cast<uint8_t>(byte(rng));
      ck.reorder_taps(src.data(), cin, taps, dst.data());
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t t = 0; t < taps; ++t)
          CHECK(dst[t * cin + ci] == src[ci * taps + t], "%s reorder_taps cin=%ld taps=%ld at (%ld, %ld)", ck.name,
                (long)cin, (long)taps, (long)ci, (long)t);
    }
  for (int64_t rows : {1, 15, 16, 17, 33})
    for (int64_t cols : {1, 8, 16, 19, 40}) {
      const int64_t ld_src = cols + 3, ld_dst = rows + 5;
      std::vector<float> src(rows * ld_src), dst(cols * ld_dst, kNaN);
      for (auto& v : src) v = normal(rng);
      std::vector<int8_t> codes(cols * ld_dst, 99);
      float absmax = 0.0f;
      for (float v : src) absmax = std::max(absmax, std::fabs(v));
      const float scale = absmax / 127.0f;
      ck.transpose(src.data(), rows, cols, ld_src, dst.data(), ld_dst, rows % 2 == 1);  // odd rows: streamed
      ck.quantize_transposed(src.data(), rows, cols, ld_src, scale, codes.data(), ld_dst);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          CHECK(dst[c * ld_dst + r] == src[r * ld_src + c], "%s transpose %ldx%ld at (%ld, %ld)", ck.name,
                (long)rows, (long)cols, (long)r, (long)c);
          CHECK(codes[c * ld_dst + r] == std::nearbyint(src[r * ld_src + c] / scale),
                "%s quantize_transposed %ldx%ld at (%ld, %ld)", ck.name, (long)rows, (long)cols, (long)r, (long)c);
        }
    }
}

struct Case {
  int64_t batch, cin, cout, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

qk::Conv2dShape shape_of(const Case& c) {
  qk::Conv2dShape s;
  s.batch = c.batch;
  s.in_channels = c.cin;
  s.height = c.h;
  s.width = c.w;
  s.out_channels = c.cout;
  s.kernel_h = c.kh;
  s.kernel_w = c.kw;
  s.stride_h = c.sh;
  s.stride_w = c.sw;
  s.pad_h = c.ph;
  s.pad_w = c.pw;
  s.dilation_h = c.dh;
  s.dilation_w = c.dw;
  s.groups = c.groups;
  return s;
}

// [b][c][h][w] <-> [b][h][w][c]
std::vector<float> to_nhwc(const std::vector<float>& x, int64_t b, int64_t c, int64_t hw) {
  std::vector<float> y(x.size());
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < c; ++j)
      for (int64_t p = 0; p < hw; ++p) y[(i * hw + p) * c + j] = x[(i * c + j) * hw + p];
  return y;
}
std::vector<float> from_nhwc(const std::vector<float>& y, int64_t b, int64_t c, int64_t hw) {
  std::vector<float> x(y.size());
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < c; ++j)
      for (int64_t p = 0; p < hw; ++p) x[(i * c + j) * hw + p] = y[(i * hw + p) * c + j];
  return x;
}

void check_conv(qk::Isa isa, std::mt19937& rng, const Case& c, int bits, bool symmetric, int64_t group_size,
                bool quantize_input, bool with_bias, bool with_nan) {
  const qk::Conv2dShape s = shape_of(c);
  qk_test::StoredWeight w = qk_test::make_weight(rng, bits, symmetric, c.cout, s.k(), group_size);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t hw = c.h * c.w, ohw = s.out_height() * s.out_width(), out_size = c.batch * c.cout * ohw;
  std::vector<float> x(c.batch * c.cin * hw), bias(c.cout);
  for (auto& v : x) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  if (with_nan) x[x.size() / 3] = kNaN;  // in image 0 of a batch of 2
  const float* b = with_bias ? bias.data() : nullptr;

  std::vector<double> want(out_size), bound(out_size);
  qk::ref::conv2d(s, x.data(), w.view, b, quantize_input, want.data());
  {  // |x| (*) |W| + |bias| bounds the rounding error of any summation order
    std::vector<double> xd(x.size()), wd(c.cout * s.k()), bd(c.cout);
    qk::ref::conv2d_activations(s, x.data(), quantize_input, xd.data());
    for (auto& v : xd) v = std::fabs(v);
    std::vector<float> row(s.k());
    for (int64_t n = 0; n < c.cout; ++n) {
      qk::ref::dequantize_row(w.view, n, row.data());
      for (int64_t i = 0; i < s.k(); ++i) wd[n * s.k() + i] = std::fabs(row[i]);
      bd[n] = std::fabs(bias[n]);
    }
    qk::ref::conv2d_dense(s, xd.data(), wd.data(), b ? bd.data() : nullptr, bound.data());
  }
  const double rtol = quantize_input ? 2e-5 : 1e-5;

  for (qk::Layout layout : {qk::Layout::nchw, qk::Layout::nhwc})
    for (int64_t threads : {1, 3}) {
      const bool nhwc = layout == qk::Layout::nhwc;
      const std::vector<float> xin = nhwc ? to_nhwc(x, c.batch, c.cin, hw) : x;
      std::vector<float> out(out_size, kNaN);
      qk::conv2d(isa, s, layout, xin.data(), w.view, b, quantize_input, out.data(), chunked(threads));
      if (nhwc) out = from_nhwc(out, c.batch, c.cout, ohw);
      int reported = 0;
      for (int64_t i = 0; i < out_size && reported < 5; ++i) {
        // A NaN in image 0 with dynamic activations makes all of image 0 NaN; otherwise compare.
        const bool nan_expected = with_nan && quantize_input && i < c.cout * ohw;
        const bool ok = nan_expected ? std::isnan(out[i])
                                     : (with_nan ? std::isnan(want[i]) == std::isnan(out[i]) : true) &&
                                           (std::isnan(want[i]) || std::fabs(out[i] - want[i]) <= rtol * bound[i] + 1e-30);
        if (!ok) ++reported;
        CHECK(ok,
              "%s %s threads=%ld b=%ld cin=%ld cout=%ld %ldx%ld k=%ldx%ld s=%ld,%ld p=%ld,%ld d=%ld,%ld g=%ld "
              "bits=%d sym=%d gs=%ld a8=%d bias=%d nan=%d: out[%ld] = %g, want %g (bound %g)",
              qk::isa_name(isa), nhwc ? "nhwc" : "nchw", (long)threads, (long)c.batch, (long)c.cin, (long)c.cout,
              (long)c.h, (long)c.w, (long)c.kh, (long)c.kw, (long)c.sh, (long)c.sw, (long)c.ph, (long)c.pw,
              (long)c.dh, (long)c.dw, (long)c.groups, bits, symmetric, (long)group_size, quantize_input, with_bias,
              with_nan, (long)i, out[i], want[i], bound[i]);
      }
    }
}

// Every path and its edges; sizes stay small so that the sanitizer build (-O0) runs them quickly.
const Case kCases[] = {
    // batch cin cout  h   w  kh kw sh sw ph pw dh dw groups
    {2, 13, 17, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1, 1},     // 1x1 direct, ragged channels
    {1, 8, 5, 7, 7, 1, 1, 2, 2, 1, 0, 1, 1, 1},       // 1x1 strided, padded: im2col
    {2, 5, 7, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1},       // 3x3
    {2, 4, 6, 20, 21, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // 3x3, 840 pixels: several bands per thread
    {1, 35, 9, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // 3x3 over 35 channels: whole 16-channel reorder tiles
    {7, 5, 6, 10, 10, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // 700 pixels in 100-pixel images: bands of whole images
    {1, 6, 4, 11, 10, 3, 3, 2, 2, 2, 2, 2, 2, 1},     // stride 2, dilation 2
    {1, 8, 6, 9, 9, 5, 5, 1, 1, 2, 2, 1, 1, 2},       // 5x5, two groups
    {1, 3, 8, 15, 14, 7, 7, 2, 2, 3, 3, 1, 1, 1},     // 7x7 stride 2 stem
    {2, 12, 6, 6, 7, 3, 1, 1, 2, 1, 0, 1, 1, 3},      // 3x1 kernel, uneven stride and padding, three groups
    {2, 20, 20, 9, 37, 3, 3, 1, 1, 1, 1, 1, 1, 20},   // depthwise, rows longer than two vectors
    {1, 7, 7, 12, 19, 3, 3, 2, 2, 1, 1, 1, 1, 7},     // depthwise stride 2
    {1, 4, 4, 11, 14, 3, 3, 3, 3, 1, 2, 1, 1, 4},     // depthwise stride 3
    {1, 5, 5, 13, 11, 5, 5, 1, 2, 4, 3, 2, 1, 5},     // depthwise 5x5, dilation 2 rows, stride 2 columns
    {1, 17, 17, 9, 9, 7, 7, 1, 1, 3, 3, 1, 1, 17},    // depthwise 7x7 (K = 49: two groups of 32)
    {2, 18, 18, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 18},    // depthwise 7x7 planes: blocks of 7 rows
    {1, 3, 3, 5, 33, 3, 3, 1, 1, 0, 1, 1, 1, 3},      // depthwise, 3 output rows of 33: blocks of 1 row
    {2, 6, 12, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 6},      // channel multiplier 2: grouped GEMM, not depthwise
    {2, 70, 37, 20, 21, 1, 1, 1, 1, 0, 0, 1, 1, 1},   // 1x1 over 420 pixels: planar, two K steps and tasks
    // Stride 1 with int8 activations runs planar on AMX and AVX-512 (NHWC too): taps from shifted quad planes.
    {2, 5, 7, 9, 8, 3, 3, 1, 1, 0, 0, 1, 1, 1},       // 3x3 unpadded: output rows narrower than input rows
    {1, 6, 9, 12, 13, 3, 3, 1, 1, 2, 1, 2, 1, 1},     // dilation 2 rows, uneven padding
    {1, 5, 4, 6, 7, 1, 1, 1, 1, 1, 2, 1, 1, 1},       // 1x1 padded: one tap, shifted
    {1, 9, 33, 23, 24, 5, 3, 1, 1, 2, 1, 1, 1, 1},    // 5x3 over 552 pixels: several chunks, K of 15 taps x 12
    // Small images on AVX-512 VNNI: planar chunks run across images (the case above the 5x3 packs 42-pixel ones).
    {3, 9, 11, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1},      // 7x7 images, 3x3: 49 pixels each
    {5, 20, 13, 5, 5, 1, 1, 1, 1, 0, 0, 1, 1, 1},     // 1x1 over 25-pixel images: images start mid-vector
    // Unpadded strided 1x1 with int8 activations: planar over the pixels read, scaled by the whole image.
    {2, 20, 13, 11, 40, 1, 1, 2, 2, 0, 0, 1, 1, 1},   // stride 2 over 40-wide rows (NaN test: an unread pixel)
    {3, 7, 9, 10, 9, 1, 1, 3, 2, 0, 0, 1, 1, 1},      // uneven strides
    // Outputs of 4 MB and more go around the caches where a plane row reaches a cache line boundary.
    {2, 6, 37, 117, 123, 1, 1, 1, 1, 0, 0, 1, 1, 1},  // 1x1, 14391-pixel planes: rows start anywhere in a line
    {60, 3, 363, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1},    // 3x3 over packed 7x7 images
};

}  // namespace

int main() {
  std::mt19937 rng(4321);
  for (qk::Isa isa : {qk::Isa::portable, qk::Isa::avx2, qk::Isa::avx512, qk::Isa::amx}) {
    if (!qk::isa_supported(isa)) {
      std::printf("skipping %s: not supported by this CPU\n", qk::isa_name(isa));
      continue;
    }
    check_building_blocks(qk::conv_kernels(isa), rng);
    struct Format {
      int bits;
      bool symmetric;
      int64_t group_size;
    };
    int variant = 0;
    for (const Case& c : kCases)
      for (Format f : {Format{8, true, 0}, Format{4, true, 0}, Format{4, false, 32}})
        for (bool quantize_input : {false, true}) {
          ++variant;
          check_conv(isa, rng, c, f.bits, f.symmetric, f.group_size, quantize_input, variant % 2 == 0, false);
        }
    for (bool quantize_input : {false, true}) {  // a NaN in one image of two
      check_conv(isa, rng, kCases[2], 8, true, 0, quantize_input, true, true);
      check_conv(isa, rng, kCases[8], 4, false, 32, quantize_input, false, true);
      check_conv(isa, rng, kCases[19], 8, true, 0, quantize_input, true, true);  // packed: image 1 stays finite
      check_conv(isa, rng, kCases[25], 8, true, 0, quantize_input, true, true);  // NaN in a pixel stride 2 skips
    }
    std::printf("%s: checked\n", qk::isa_name(isa));
  }
  return TEST_MAIN_RESULT("test_conv2d");
}
