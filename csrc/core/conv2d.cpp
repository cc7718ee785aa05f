// conv2d (conv2d.h): picks the path and runs its phases over the caller's threads.
#include "conv2d.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <vector>

#include "linear_a8.h"
#include "linear_a8_plan.h"
#include "reference.h"

namespace qk {
namespace {

// Output pixels per im2col band and GEMM call. Where the weight is not packed ahead (weight-only, or no packed
// kernel) the GEMM kernels pack it once per call, so a band should be tall enough to amortise that over many
// rows (256 rows: the packing is a few percent of the MACs), and small enough that the band stays in L2:
// 256 rows x K = 4608 (3x3 over 512 channels) is 1.2 MB of int8 of a 2 MB L2.
constexpr int64_t kBandRows = 256;
// When the threads share one band (few pixels): output channels per GEMM task (the linear kernels' column tile,
// or the packed kernel's unit), and rows per im2col or store task.
constexpr int64_t kColumnTile = 16;
static_assert(kPackedA8Columns % kColumnTile == 0, "a packed unit is whole column tiles");
constexpr int64_t kSharedRowChunk = 32;
// Pixels per task that quantizes or transposes an image: NCHW rows are read in runs of 1 KB, and the NHWC block
// written (256 x C) stays in L2 while the channels pass over it.
constexpr int64_t kPixelBlock = 256;
// Outputs from this size are written around the caches (ConvKernels::transpose): they would not stay in L2 (2 MB
// a core) anyway, and the stores then skip reading every line first. Measured, NCHW int8-activation ResNet-50
// layers at batch 8, 2 threads: 25.7 MB (stage1 1x1 expand) 4.7 -> 2.9 ms, 6.4 MB (stage1 3x3) 2.5 -> 1.9,
// 6.4 MB (stage3 1x1 expand) 0.94 -> 0.76; 3.2 MB (stage4 1x1 expand) 0.74 either way.
constexpr int64_t kStreamOutputBytes = 4 << 20;
bool stream_output(const Conv2dShape& s) {
  return s.batch * s.out_channels * s.out_height() * s.out_width() * int64_t{sizeof(float)} >= kStreamOutputBytes;
}
// The planar path (amx::planar_a8, avx512::planar_a8): K within one int32 segment, and pixels per chunk, whose
// codes (K x pixels bytes: 36 KB for a 1x1 over 144 channels, 147 KB for a 3x3 over 64) are built and then
// multiplied while in cache, a multiple of the product's 32-pixel blocks.
constexpr int64_t kPlanarMaxK = 65536;
constexpr int64_t kPlanarPixels = 256;
constexpr int64_t kPlanarMinPixels = 32;
constexpr int64_t kPlanarChunkBytes = 512 << 10;
// Smallest piece of an image one thread takes the absmax of.
constexpr int64_t kMinAbsmaxPiece = 16384;
// Input rows a depthwise NHWC band stages as codes: well inside L2 with the band's output rows.
constexpr int64_t kDepthwiseStagedBytes = 256 << 10;

// Scratch memory by role: one grow-only buffer per thread and role, so that repeated calls reuse memory instead
// of faulting in fresh pages (malloc maps buffers this large afresh every time). Contents are undefined.
enum class Scratch : int {
  prepared_weight, reordered_rows, activations, subsampled, shared_rows, shared_y, shared_scales,  // the caller's
  weight_codes, band_rows, band_y, band_scales, staged_plane, staged_row, planar_codes, planar_out,  // every worker's
  count
};

template <typename T>
T* scratch(Scratch role, int64_t n) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[static_cast<int>(Scratch::count)];
  Buffer& b = buffers[static_cast<int>(role)];
  const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  if (bytes > b.bytes) {
    std::free(b.data);
    b.bytes = 0;
    b.data = std::aligned_alloc(64, bytes);
    if (b.data == nullptr) throw std::bad_alloc();
    b.bytes = bytes;
  }
  return static_cast<T*>(b.data);
}

using a8::round_up;

// run_for's claims take n / (threads * this) items each, at least one: about this many claims a thread, fine
// enough that a faster thread can take over much of a slower one's share.
constexpr int64_t kClaimsPerThread = 8;

// body over [0, n) on the caller's threads. Each thread claims the next block of items from a shared counter
// until none are left, instead of taking a fixed share: on a shared host one vCPU can run at half speed for
// seconds, and a fixed split makes the whole call wait for it (a conv then takes nearly the time of its slower
// half, where claiming lets the faster thread take over the rest).
void run_for(const Parallel& par, int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  const int64_t threads = std::min(n, par.num_threads);
  if (threads <= 1 || !par.for_range) {
    body(0, n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n / (threads * kClaimsPerThread));
  std::atomic<int64_t> next{0};
  par.for_range(threads, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(grain); i < n; i = next.fetch_add(grain)) body(i, std::min(n, i + grain));
  });
}

// A scale the quantizer can divide by. An all-zero image has scale 0 (codes all zero); an image holding NaN or
// Inf has a non-finite one (codes zero, and every output NaN).
bool usable(float scale) { return std::isfinite(scale) && scale > 0.0f; }

// One scale per image (formats.h): absmax / 127 in float32, NaN for an image holding a NaN. Images are cut into
// pieces so that batch 1 still spreads over every thread.
std::vector<float> image_scales(const ConvKernels& ck, const float* x, int64_t batch, int64_t image_size,
                                const Parallel& par) {
  const int64_t pieces = std::clamp<int64_t>(image_size / kMinAbsmaxPiece, 1, (par.num_threads + batch - 1) / batch);
  const int64_t piece = (image_size + pieces - 1) / pieces;
  std::vector<float> partial(batch * pieces);
  run_for(par, batch * pieces, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t begin = i % pieces * piece, len = std::min(piece, image_size - begin);
      partial[i] = len > 0 ? ck.absmax(x + i / pieces * image_size + begin, len) : 0.0f;
    }
  });
  std::vector<float> scales(batch);
  for (int64_t b = 0; b < batch; ++b) {
    float m = 0.0f;
    for (int64_t j = 0; j < pieces; ++j) {
      const float p = partial[b * pieces + j];
      m = (std::isnan(p) || p > m) ? p : m;  // once NaN, stays NaN
    }
    scales[b] = m / static_cast<float>(kActInt8QMax);
  }
  return scales;
}

// Runs consume(b, scale, u0, u1) over units [u0, u1) of the work on image b, every unit of every image once, and
// returns the images' scales: 1 for weight-only, else image_scales' (or given_scales where the caller has them).
// With dynamic activations and at least one image per thread, a thread takes the absmax of an image and consumes
// it at once, while the image is in its cache.
template <typename Consume>
std::vector<float> for_each_image(const ConvKernels& ck, const float* x, int64_t batch, int64_t image_size,
                                  int64_t units, bool quantize_input, const Parallel& par, const Consume& consume,
                                  const float* given_scales = nullptr) {
  if (quantize_input && given_scales == nullptr && batch >= par.num_threads) {
    std::vector<float> scales(batch);
    run_for(par, batch, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scales[b] = ck.absmax(x + b * image_size, image_size) / static_cast<float>(kActInt8QMax);
        consume(b, scales[b], int64_t{0}, units);
      }
    });
    return scales;
  }
  std::vector<float> scales = !quantize_input       ? std::vector<float>(batch, 1.0f)
                             : given_scales != nullptr ? std::vector<float>(given_scales, given_scales + batch)
                                                       : image_scales(ck, x, batch, image_size, par);
  run_for(par, batch * units, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {  // one call per image the range touches
      const int64_t b = i / units, end = std::min(i1, (b + 1) * units);
      consume(b, scales[b], i - b * units, end - b * units);
      i = end;
    }
  });
  return scales;
}

// Pixels [p0, p1) of image b as int8 codes at xq[pixel][ld], channels innermost; zero in [C, ld), and for an
// unusable scale.
void quantize_pixels(const ConvKernels& ck, const Conv2dShape& s, Layout layout, const float* x, int64_t b,
                     float scale, int64_t p0, int64_t p1, int8_t* xq, int64_t ld) {
  const int64_t C = s.in_channels, pixels = s.height * s.width, np = p1 - p0;
  const float* image = x + b * C * pixels;
  int8_t* dst = xq + (b * pixels + p0) * ld;
  if (!usable(scale)) {
    std::memset(dst, 0, np * ld);
    return;
  }
  if (layout == Layout::nchw) {
    ck.quantize_transposed(image + p0, C, np, pixels, scale, dst, ld);
  } else if (ld == C) {
    ck.quantize_int8(image + p0 * C, np * C, scale, dst);
  } else {
    for (int64_t p = 0; p < np; ++p) ck.quantize_int8(image + (p0 + p) * C, C, scale, dst + p * ld);
  }
  if (ld > C)
    for (int64_t p = 0; p < np; ++p) std::memset(dst + p * ld + C, 0, ld - C);
}

// The ng output channels of conv group g: rows [g * ng, (g + 1) * ng) of w.
WeightView group_rows(const WeightView& w, int64_t g, int64_t ng) {
  WeightView wg = w;
  wg.n = ng;
  wg.qdata = static_cast<const uint8_t*>(w.qdata) + g * ng * w.row_bytes();
  wg.scale = w.scale + g * ng * w.n_groups();
  if (w.zero_point) wg.zero_point = w.zero_point + g * ng * w.n_groups();
  return wg;
}

// The weight with each row's K permuted from (cin, kh, kw) to (kh, kw, cin), into storage (w.n x w.row_bytes()).
// Only for one scale group per row: the scale and zero point apply to the whole row, so they carry over
// unchanged. The padding past K stays where it is.
WeightView reorder_taps_major(const ConvKernels& ck, const WeightView& w, int64_t cin, int64_t taps, uint8_t* storage,
                              const Parallel& par) {
  run_for(par, w.n, [&](int64_t n0, int64_t n1) {
    // int4 rows are unpacked to one code per byte, reordered, and packed again.
    uint8_t* codes = w.bits == 4 ? scratch<uint8_t>(Scratch::weight_codes, 2 * w.k_pad) : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* src = static_cast<const uint8_t*>(w.qdata) + n * w.row_bytes();
      uint8_t* dst = storage + n * w.row_bytes();
      if (w.bits == 8) {
        ck.reorder_taps(src, cin, taps, dst);
        std::memcpy(dst + w.k, src + w.k, w.k_pad - w.k);
        continue;
      }
      uint8_t* unpacked = codes + w.k_pad;
      for (int64_t j = 0; j < w.k_pad / 2; ++j) {
        codes[2 * j] = src[j] & 0xF;
        codes[2 * j + 1] = src[j] >> 4;
      }
      ck.reorder_taps(codes, cin, taps, unpacked);
      for (int64_t i = w.k; i < w.k_pad; ++i) unpacked[i] = codes[i];
      for (int64_t j = 0; j < w.k_pad / 2; ++j) dst[j] = static_cast<uint8_t>(unpacked[2 * j] | (unpacked[2 * j + 1] << 4));
    }
  });
  WeightView out = w;
  out.qdata = storage;
  return out;
}

// The convolution as GEMMs over NHWC activations of element type T: int8 codes (dynamic activations, through
// linear_a8) or float (weight-only, through linear_f32).
template <typename T>
struct GemmConv {
  const Conv2dShape& s;
  Layout layout;
  const LinearKernels& lk;
  const ConvKernels& ck;
  const PreparedConvWeight& pw;
  const T* in;               // NHWC activations, ld_in elements per pixel
  int64_t ld_in;
  bool direct;               // 1x1, stride 1, unpadded, one group: the GEMM rows are `in` itself
  int64_t row_len;           // elements per GEMM row: w.k_pad for int8 (zero past w.k), w.k for float
  const float* image_scale;  // [batch], int8 only
  const float* bias;
  float* out;

  int64_t out_pixels() const { return s.out_height() * s.out_width(); }
  // Groups == 1 into NHWC: the GEMM's [pixel][channel] rows are the output itself.
  bool writes_out() const { return s.groups == 1 && layout == Layout::nhwc; }

  WeightView group_weight(int64_t g) const { return group_rows(pw.view, g, s.group_out()); }

  void gemm(int64_t g, const T* rows, int64_t m, const float* row_scale, float* y, int64_t n0, int64_t n1) const {
    const float* bias_g = bias ? bias + g * s.group_out() : nullptr;
    if constexpr (std::is_same_v<T, int8_t>) {
      const bool stream = writes_out() && stream_output(s);  // y is the output itself
      if (pw.packed)
        lk.linear_a8_packed(group_weight(g), pw.packed + g * pw.packed_group_bytes, rows, row_scale, m, bias_g, y, n0,
                            n1, stream);
      else
        lk.linear_a8(group_weight(g), rows, row_scale, m, bias_g, y, n0, n1, stream);
    } else
      lk.linear_f32(group_weight(g), rows, ActType::f32, m, bias_g, y, n0, n1);
  }

  void fill_scales(int64_t r0, int64_t r1, float* dst) const {
    if constexpr (std::is_same_v<T, int8_t>)
      for (int64_t r = r0; r < r1;) {  // image by image
        const int64_t b = r / out_pixels(), end = std::min(r1, (b + 1) * out_pixels());
        std::fill(dst + r - r0, dst + end - r0, image_scale[b]);
        r = end;
      }
  }

  // GEMM rows [r0, r1) of group g into rows[r - r0][row_len]: for each tap, that group's channels of the input
  // pixel under it, or zeros where the tap falls in the padding.
  void im2col(int64_t g, int64_t r0, int64_t r1, T* rows) const {
    const int64_t OW = s.out_width(), cg = s.group_in(), taps = s.taps(), k = s.k();
    // Taps of one kernel row read neighbouring pixels: with dilation 1 and the pixels' channels adjacent
    // (one group), a whole kernel row is one contiguous copy.
    const bool taps_major = pw.taps_major;
    const bool row_runs = taps_major && s.dilation_w == 1 && cg == ld_in;
    int64_t b = r0 / out_pixels(), oh = r0 % out_pixels() / OW, ow = r0 % OW;  // of row r, stepped along
    for (int64_t r = r0; r < r1; ++r, ++ow) {
      if (ow == OW) {
        ow = 0;
        if (++oh == s.out_height()) oh = 0, ++b;
      }
      T* dst = rows + (r - r0) * row_len;
      const T* image = in + b * s.height * s.width * ld_in + g * cg;
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        const int64_t ih = oh * s.stride_h - s.pad_h + kh * s.dilation_h;
        const int64_t iw0 = ow * s.stride_w - s.pad_w;
        const bool row_inside = ih >= 0 && ih < s.height;
        if (row_runs && row_inside && iw0 >= 0 && iw0 + s.kernel_w <= s.width) {
          std::memcpy(dst + kh * s.kernel_w * cg, image + (ih * s.width + iw0) * ld_in, s.kernel_w * cg * sizeof(T));
          continue;
        }
        for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
          const int64_t iw = iw0 + kw * s.dilation_w, t = kh * s.kernel_w + kw;
          const T* src = row_inside && iw >= 0 && iw < s.width ? image + (ih * s.width + iw) * ld_in : nullptr;
          if (taps_major) {
            if (src)
              std::memcpy(dst + t * cg, src, cg * sizeof(T));
            else
              std::memset(dst + t * cg, 0, cg * sizeof(T));
          } else {
            for (int64_t ci = 0; ci < cg; ++ci) dst[ci * taps + t] = src ? src[ci] : T(0);
          }
        }
      }
      std::memset(dst + k, 0, (row_len - k) * sizeof(T));
    }
  }

  // GEMM results y[r - r0][group_out] of rows [r0, r1) into the output channels of group g.
  void store(const float* y, int64_t r0, int64_t r1, int64_t g) const {
    const int64_t ng = s.group_out(), c0 = g * ng, opix = out_pixels();
    if (layout == Layout::nhwc) {
      for (int64_t r = r0; r < r1; ++r)
        std::memcpy(out + r * s.out_channels + c0, y + (r - r0) * ng, ng * sizeof(float));
      return;
    }
    for (int64_t r = r0; r < r1;) {  // one transpose per image the rows touch
      const int64_t b = r / opix, q = r % opix, len = std::min(r1 - r, opix - q);
      ck.transpose(y + (r - r0) * ng, len, ng, ng, out + (b * s.out_channels + c0) * opix + q, opix,
                   stream_output(s));
      r += len;
    }
  }

  void run(const Parallel& par) const {
    const int64_t M = s.batch * out_pixels(), ng = s.group_out();
    const int64_t threads = std::max<int64_t>(1, par.num_threads);
    // Bands hold whole images where images are smaller than a band, so that the NCHW store transposes whole planes.
    const int64_t unit = out_pixels() < kBandRows ? out_pixels() : 1, units = M / unit;
    int64_t bands = (units + kBandRows / unit - 1) / (kBandRows / unit);
    if (bands >= threads || threads == 1) {
      // Each thread takes whole bands: im2col, GEMM over every output channel, store, while the band is in cache.
      bands = (bands + threads - 1) / threads * threads;  // equal bands, as many as a multiple of the threads
      const int64_t band = (units + bands - 1) / bands * unit;
      bands = (M + band - 1) / band;
      run_for(par, bands, [&](int64_t i0, int64_t i1) {
        T* rows_buf = direct ? nullptr : scratch<T>(Scratch::band_rows, band * row_len);
        float* y_buf = writes_out() ? nullptr : scratch<float>(Scratch::band_y, band * ng);
        float* scale_buf = scratch<float>(Scratch::band_scales, band);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r0 = i * band, r1 = std::min(M, r0 + band);
          fill_scales(r0, r1, scale_buf);
          for (int64_t g = 0; g < s.groups; ++g) {
            const T* rows = in + r0 * ld_in;
            if (!direct) {
              im2col(g, r0, r1, rows_buf);
              rows = rows_buf;
            }
            float* y = writes_out() ? out + r0 * s.out_channels : y_buf;
            gemm(g, rows, r1 - r0, scale_buf, y, 0, ng);
            if (!writes_out()) store(y, r0, r1, g);
          }
        }
      });
      return;
    }
    // Few pixels (late layers at small batch): the threads share all rows and split the output channels.
    T* rows_buf = direct ? nullptr : scratch<T>(Scratch::shared_rows, M * row_len);
    float* y_buf = writes_out() ? nullptr : scratch<float>(Scratch::shared_y, M * ng);
    float* scale_buf = scratch<float>(Scratch::shared_scales, M);
    fill_scales(0, M, scale_buf);
    const T* rows = direct ? in : rows_buf;
    float* y = writes_out() ? out : y_buf;
    const int64_t pixel_blocks = (M + kSharedRowChunk - 1) / kSharedRowChunk;
    for (int64_t g = 0; g < s.groups; ++g) {
      if (!direct)
        run_for(par, pixel_blocks, [&](int64_t i0, int64_t i1) {
          const int64_t r0 = i0 * kSharedRowChunk, r1 = std::min(M, i1 * kSharedRowChunk);
          im2col(g, r0, r1, rows_buf + r0 * row_len);
        });
      const int64_t tile = pw.packed ? kPackedA8Columns : kColumnTile;
      run_for(par, (ng + tile - 1) / tile, [&](int64_t t0, int64_t t1) {
        gemm(g, rows, M, scale_buf, y, t0 * tile, std::min(ng, t1 * tile));
      });
      if (!writes_out())
        run_for(par, pixel_blocks, [&](int64_t i0, int64_t i1) {
          const int64_t r0 = i0 * kSharedRowChunk, r1 = std::min(M, i1 * kSharedRowChunk);
          store(y + r0 * ng, r0, r1, g);
        });
    }
  }
};

// Depthwise: every channel convolved with its own kh x kw filter, dequantized to float here (C x kh x kw
// values). Dynamic activations run on the codes as floats (exact small integers), scaled by the image's scale at
// the end: the same products as the reference, summed in float32.
void depthwise(const ConvKernels& ck, const Conv2dShape& s, Layout layout, const float* x, const WeightView& w,
               const float* bias, bool quantize_input, float* out, const Parallel& par) {
  const int64_t C = s.in_channels, taps = s.taps(), H = s.height, W = s.width;
  const int64_t OH = s.out_height(), OW = s.out_width(), image = C * H * W;
  std::vector<float> filters(C * taps);  // [C][taps]
  for (int64_t c = 0; c < C; ++c) ref::dequantize_row(w, c, filters.data() + c * taps);

  if (layout == Layout::nchw) {
    const int64_t padded_h = H + 2 * s.pad_h, padded_w = W + 2 * s.pad_w;
    DepthwisePlane plane;
    plane.phase_len = (padded_w + s.stride_w - 1) / s.stride_w + kDepthwisePlaneSlack;
    plane.row_stride = s.stride_w * plane.phase_len;
    plane.in_h = H;
    plane.in_w = W;
    plane.pad_h = s.pad_h;
    plane.pad_w = s.pad_w;
    plane.out_h = OH;
    plane.out_w = OW;
    plane.kernel_h = s.kernel_h;
    plane.kernel_w = s.kernel_w;
    plane.stride_h = s.stride_h;
    plane.stride_w = s.stride_w;
    plane.dilation_h = s.dilation_h;
    plane.dilation_w = s.dilation_w;
    std::vector<int64_t> tap_offset(taps);
    for (int64_t kh = 0; kh < s.kernel_h; ++kh)
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        const int64_t col = kw * s.dilation_w;  // padded column of the tap, from the output's first
        tap_offset[kh * s.kernel_w + kw] = kh * s.dilation_h * plane.row_stride +
                                           col % s.stride_w * plane.phase_len + col / s.stride_w;
      }
    plane.tap_offset = tap_offset.data();
    // Units: the image's channels, one plane each, staged with its padding and then convolved.
    for_each_image(ck, x, s.batch, image, C, quantize_input, par, [&](int64_t b, float scale, int64_t c0, int64_t c1) {
      DepthwisePlane p = plane;
      p.staged = scratch<float>(Scratch::staged_plane, padded_h * plane.row_stride);
      p.row = scratch<float>(Scratch::staged_row, W);
      // Staging writes only the image's positions: zero the padding once for all the planes of this call.
      std::fill(p.staged, p.staged + padded_h * plane.row_stride, 0.0f);
      for (int64_t c = c0; c < c1; ++c)
        ck.depthwise_plane(p, x + (b * C + c) * H * W, quantize_input, filters.data() + c * taps, scale,
                           bias ? bias[c] : 0.0f, out + (b * C + c) * OH * OW);
    });
    return;
  }

  std::vector<float> filters_tc(taps * C);  // [taps][C]: a tap's weights for consecutive channels
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < taps; ++t) filters_tc[t * C + c] = filters[c * taps + t];
  if (!quantize_input) {
    run_for(par, s.batch * OH, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1;) {  // one call per image the range touches
        const int64_t b = i / OH, end = std::min(i1, (b + 1) * OH);
        ck.depthwise_nhwc(s, x + b * image, 0, false, filters_tc.data(), bias, 1.0f, out + b * OH * OW * C, i - b * OH,
                          end - b * OH);
        i = end;
      }
    });
    return;
  }
  // Dynamic activations: bands of output rows, each band's input rows staged as codes (floats, once per element
  // rather than once per tap) just before they are convolved, so the input is read once after its absmax and the
  // codes never leave L2. A band's rows overlap the next band's by the kernel's reach; those are staged twice.
  const int64_t row_bytes = W * C * int64_t{sizeof(float)};
  const int64_t reach = (s.kernel_h - 1) * s.dilation_h + 1;  // input rows one output row reads
  const int64_t band = std::clamp<int64_t>((kDepthwiseStagedBytes / row_bytes - reach) / s.stride_h + 1, 1,
                                           std::max<int64_t>(1, (OH + 3) / 4));  // 4 bands an image or more
  const int64_t bands = (OH + band - 1) / band;
  for_each_image(ck, x, s.batch, image, bands, true, par, [&](int64_t b, float scale, int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t oh0 = u * band, oh1 = std::min(OH, oh0 + band);
      const int64_t r0 = std::clamp<int64_t>(oh0 * s.stride_h - s.pad_h, 0, H);
      const int64_t r1 = std::clamp<int64_t>((oh1 - 1) * s.stride_h - s.pad_h + reach, r0, H);
      float* codes = scratch<float>(Scratch::staged_plane, std::max<int64_t>(1, (r1 - r0) * W * C));
      if (usable(scale))
        ck.quantize_f32(x + b * image + r0 * W * C, (r1 - r0) * W * C, scale, codes);
      else
        std::fill(codes, codes + (r1 - r0) * W * C, 0.0f);
      ck.depthwise_nhwc(s, codes, r0, true, filters_tc.data(), bias, scale, out + b * OH * OW * C, oh0, oh1);
    }
  });
}

// Lanes the planar product computes for a run of `len` pixels: 32-pixel blocks, the last one 16 wide where it can.
int64_t planar_lanes(int64_t len) {
  const int64_t rest = len % 32;
  return len - rest + (rest == 0 ? 0 : rest <= 16 ? 16 : 32);
}

// The chunks of a planar conv, ranges of output pixels in the space of all images' pixels one after another:
// their codes (K x pixels bytes) are built and multiplied while in cache. Per image: kPlanarPixels each, or less
// where the chunk's B rows would crowd L2 or where that keeps every thread busy (small images, small batch).
// Packed (avx512::planar_a8 only, which takes several images' pixels in one chunk): where small images would
// leave more than 1 / pack_over of the lanes idle (7x7: 49 pixels in 64 lanes), the chunks run across image
// boundaries instead, starting on whole vectors, as many as the threads need and no larger than the L2 bound;
// pack_over 0: never.
struct PlanarChunks {
  int64_t size = kPlanarPixels, ld = 0, count = 0, pixels = 0, total = 0;
  int64_t per_image = 0;  // chunks an image, where not packed
  int64_t vectors = 0;    // packed: the 16-pixel vectors of all images, split evenly over the chunks
  bool packed = false;

  PlanarChunks(int64_t pack_over, int64_t batch, int64_t pixels_, int64_t k, const Parallel& par)
      : pixels(pixels_), total(batch * pixels_) {
    while (size > kPlanarMinPixels &&
           (size * k > kPlanarChunkBytes || batch * ((pixels + size - 1) / size) < 2 * par.num_threads))
      size /= 2;
    ld = std::min(size, round_up(pixels, kPlanarMinPixels));
    per_image = (pixels + size - 1) / size;
    count = batch * per_image;
    vectors = (total + 15) / 16;
    const int64_t image_lanes = (per_image - 1) * size + planar_lanes(pixels - (per_image - 1) * size);
    if (pack_over == 0 || pack_over * batch * image_lanes <= (pack_over + 1) * 16 * vectors) return;
    const int64_t most = std::max<int64_t>(2, std::min(kPlanarPixels, kPlanarChunkBytes / k) / 16);
    packed = true;
    count = std::min(round_up((vectors + most - 1) / most, par.num_threads), std::max<int64_t>(1, vectors / 2));
    ld = round_up((vectors + count - 1) / count * 16, kPlanarMinPixels);
  }
  // Chunk i: pixels [begin(i), end(i)) of all images.
  int64_t begin(int64_t i) const {
    return packed ? std::min(total, 16 * (i * vectors / count)) : i / per_image * pixels + i % per_image * size;
  }
  int64_t end(int64_t i) const {
    return packed ? begin(i + 1) : std::min(begin(i) + size, (i / per_image + 1) * pixels);
  }
};

// A stride-1 conv with int8 activations, planar throughout (amx::planar_a8 on the tile unit, avx512::planar_a8 on
// VNNI): output channels x pixels. NCHW: the input's planes quantized straight into quads of channels and the
// product's rows stored as output plane rows, no transpose of input or output. NHWC: each pixel's channels
// quantized into the same quads (ConvKernels::quantize_quads_nhwc), and the product's epilogue storing pixel rows
// (or, see multiply, each chunk transposed into them from a buffer).
// 1x1 unpadded, per image: after an image's scale, each chunk of its pixels is quantized from the input into
// quads of channels and multiplied at once, the codes still in L1/L2 (where a thread has whole images, the
// quantizer rereads the input from L2, where the absmax left it). Otherwise (taps, padding, or packed chunks):
// each image quantized into quad planes first, then each chunk's B rows gathered tap by tap from them
// (ConvKernels::tap_quads).
void planar_conv(Isa isa, const ConvKernels& ck, const Conv2dShape& s, Layout layout, const float* x,
                 const PreparedConvWeight& pw, const float* bias, float* out, const Parallel& par,
                 const float* scales_in = nullptr) {
  const int64_t C = s.in_channels, N = s.out_channels, pixels = s.height * s.width, image = C * pixels;
  const int64_t out_pixels = s.out_height() * s.out_width(), taps = s.taps();
  const int64_t ld_w = amx::planar_row_bytes(pw.view, taps), quads = ld_w / 4;
  const bool nhwc = layout == Layout::nhwc;
  // Packed chunks gather their B rows from quad planes. Convs with taps do anyway: pack them where over 1/32 of
  // the lanes would idle (ResNet-50 stage3 3x3, 196 pixels in 208 lanes: 0.96x the time). An unpadded 1x1 would
  // give up quantizing its chunks straight from the input (384->64 at 14x14, 1/16 idle, measured 1.05x the time
  // packed): only past 1/8.
  const bool direct_1x1 = taps == 1 && s.pad_h == 0 && s.pad_w == 0;
  const PlanarChunks chunks(isa == Isa::amx ? 0 : direct_1x1 ? 8 : 32, s.batch, out_pixels, ld_w, par);
  const bool stream = stream_output(s);
  // The product of one chunk's codes into its pieces' outputs: plane rows ld_out floats apart, or (pixel_rows,
  // VNNI only) pixel rows of ld_out floats.
  auto product = [&](const int8_t* codes, const PlanarPiece* pieces, int64_t count, int64_t ld_out, bool streamed,
                     bool pixel_rows) {
    if (isa != Isa::amx) {
      avx512::planar_a8(pw.planar, ld_w, pw.view, pw.planar_corrections, codes, chunks.ld, pieces, count, bias,
                        ld_out, streamed, pixel_rows);
      return;
    }
    for (int64_t i = 0; i < count; ++i)  // one piece a chunk: AMX chunks are never packed
      amx::planar_a8(pw.planar, ld_w, pw.view, codes + 4 * pieces[i].begin, chunks.ld, pieces[i].x_scale, bias,
                     pieces[i].out, ld_out, 0, pieces[i].end - pieces[i].begin, streamed);
  };
  // Where image b's output pixel p0 goes: its plane rows start there (NCHW, rows out_pixels apart) or its pixel
  // row does (NHWC).
  auto place = [&](int64_t b, int64_t p0) {
    return nhwc ? out + (b * out_pixels + p0) * N : out + b * N * out_pixels + p0;
  };
  // NHWC outputs that stay in cache: VNNI's epilogue stores pixel rows. Larger ones (and on AMX): the product goes
  // to a chunk buffer [N][chunks.ld] and each piece's columns are transposed into its pixel rows, written around
  // the caches (pixel rows straight from the epilogue are stored 8 channels at a time: ResNet-50 stage1 1x1 expand
  // in channels_last took 1.70x the NCHW time that way, 1.36x buffered).
  auto multiply = [&](const int8_t* codes, const PlanarPiece* pieces, int64_t count) {
    if (!nhwc) {
      product(codes, pieces, count, out_pixels, stream, false);
      return;
    }
    if (isa != Isa::amx && !stream) {
      product(codes, pieces, count, N, false, true);
      return;
    }
    float* rows = scratch<float>(Scratch::planar_out, N * chunks.ld);
    std::vector<PlanarPiece> buffered(pieces, pieces + count);
    for (PlanarPiece& piece : buffered) piece.out = rows + (piece.begin - pieces[0].begin);
    product(codes, buffered.data(), count, chunks.ld, false, false);
    for (int64_t i = 0; i < count; ++i)
      ck.transpose(buffered[i].out, N, pieces[i].end - pieces[i].begin, chunks.ld, pieces[i].out, N, stream);
  };
  // Rows [0, rows) of channel quads of pixels [p0, p0 + len) of image b into dst [rows][ld_dst], words [0, width)
  // of each; zero past the channels and the pixels.
  const int64_t cin_quads = round_up(C, 4) / 4;
  auto quantize = [&](int64_t b, float scale, int64_t p0, int64_t len, int64_t rows, int8_t* dst, int64_t ld_dst,
                      int64_t width) {
    int64_t written = 0;
    if (usable(scale) && nhwc) {
      ck.quantize_quads_nhwc(x + b * image + p0 * C, C, len, C, scale, dst, ld_dst, width);
      written = cin_quads;
    } else if (usable(scale)) {
      ck.quantize_quads(x + b * image + p0, C, len, pixels, scale, dst, ld_dst, 0, rows);
      written = rows;
    }
    for (int64_t q = written; q < rows; ++q) std::memset(dst + 4 * q * ld_dst, 0, 4 * width);
  };
  if (direct_1x1 && !chunks.packed) {
    const int64_t per_image = chunks.per_image;
    for_each_image(ck, x, s.batch, image, per_image, true, par, [&](int64_t b, float scale, int64_t u0, int64_t u1) {
      int8_t* codes = scratch<int8_t>(Scratch::planar_codes, quads * chunks.ld * 4);
      for (int64_t u = b * per_image + u0; u < b * per_image + u1; ++u) {
        const int64_t g0 = chunks.begin(u), p0 = g0 - b * pixels, len = chunks.end(u) - g0;
        const PlanarPiece piece{0, len, scale, place(b, p0)};
        quantize(b, scale, p0, len, quads, codes, chunks.ld, chunks.ld);
        multiply(codes, &piece, 1);
      }
    }, scales_in);
    return;
  }
  const int64_t ld_plane = round_up(pixels, 16);
  int8_t* planes = scratch<int8_t>(Scratch::activations, s.batch * cin_quads * ld_plane * 4);
  // Units of an image: its quads (NCHW: a quad reads four planes) or blocks of its pixels (NHWC: a pixel's channels
  // are one run of memory).
  const int64_t units = nhwc ? (pixels + kPixelBlock - 1) / kPixelBlock : cin_quads;
  const std::vector<float> scales =
      for_each_image(ck, x, s.batch, image, units, true, par, [&](int64_t b, float scale, int64_t u0, int64_t u1) {
        int8_t* image_planes = planes + b * cin_quads * ld_plane * 4;
        if (nhwc) {
          const int64_t p0 = u0 * kPixelBlock, p1 = std::min(u1 * kPixelBlock, pixels);
          const int64_t width = (p1 == pixels ? ld_plane : p1) - p0;  // the last block: the padding too
          quantize(b, scale, p0, p1 - p0, cin_quads, image_planes + 4 * p0, ld_plane, width);
        } else if (!usable(scale)) {
          std::memset(image_planes + u0 * ld_plane * 4, 0, (u1 - u0) * ld_plane * 4);
        } else {
          ck.quantize_quads(x + b * image, C, pixels, pixels, scale, image_planes, ld_plane, u0, u1);
        }
      }, scales_in);
  run_for(par, chunks.count, [&](int64_t i0, int64_t i1) {
    int32_t* rows = scratch<int32_t>(Scratch::planar_codes, quads * chunks.ld);
    // K past the taps: zero codes (the weight is zero there too; this keeps the bytes defined).
    std::memset(rows + taps * cin_quads * chunks.ld, 0, (quads - taps * cin_quads) * chunks.ld * 4);
    std::vector<PlanarPiece> pieces;
    for (int64_t i = i0; i < i1; ++i) {
      pieces.clear();  // one per image the chunk covers
      const int64_t g0 = chunks.begin(i), g1 = chunks.end(i);
      for (int64_t g = g0; g < g1;) {
        const int64_t b = g / out_pixels, p0 = g % out_pixels, len = std::min(g1 - g, out_pixels - p0);
        const int32_t* image_planes = reinterpret_cast<const int32_t*>(planes) + b * cin_quads * ld_plane;
        for (int64_t kh = 0; kh < s.kernel_h; ++kh)
          for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
            const int64_t t = kh * s.kernel_w + kw, dy = kh * s.dilation_h - s.pad_h, dx = kw * s.dilation_w - s.pad_w;
            ck.tap_quads(image_planes, cin_quads, ld_plane, s.height, s.width, s.out_width(), dy, dx, p0, len,
                         rows + t * cin_quads * chunks.ld + (g - g0), chunks.ld);
          }
        pieces.push_back({g - g0, g - g0 + len, scales[b], place(b, p0)});
        g += len;
      }
      multiply(reinterpret_cast<const int8_t*>(rows), pieces.data(), static_cast<int64_t>(pieces.size()));
    }
  });
}

// An unpadded strided 1x1 conv is the stride-1 conv of the pixels it reads, with the whole images' scales (every
// pixel counts towards an image's absmax, as in the reference).
void planar_strided_1x1(Isa isa, const ConvKernels& ck, const Conv2dShape& s, const float* x,
                        const PreparedConvWeight& pw, const float* bias, float* out, const Parallel& par) {
  const int64_t C = s.in_channels, pixels = s.height * s.width;
  const std::vector<float> scales = image_scales(ck, x, s.batch, C * pixels, par);
  Conv2dShape picked = s;
  picked.height = s.out_height();
  picked.width = s.out_width();
  picked.stride_h = picked.stride_w = 1;
  const int64_t picked_pixels = picked.height * picked.width;
  float* xs = scratch<float>(Scratch::subsampled, s.batch * C * picked_pixels);
  run_for(par, s.batch * C, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      ck.subsample(x + i * pixels, s.width, s.stride_h, s.stride_w, picked.height, picked.width,
                   xs + i * picked_pixels);
  });
  planar_conv(isa, ck, picked, Layout::nchw, xs, pw, bias, out, par, scales.data());
}

}  // namespace

const ConvKernels& conv_kernels(Isa isa) {
  switch (isa) {
    case Isa::amx:  // the tile unit is for the GEMM (kernels(Isa::amx)); the rest runs on AVX-512
    case Isa::avx512: return avx512_conv_kernels();
    case Isa::avx2: return avx2_conv_kernels();
    case Isa::portable: break;
  }
  return portable_conv_kernels();
}

namespace {

bool direct_rows(const Conv2dShape& s) {
  return s.taps() == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0 && s.groups == 1;
}

// What prepare_conv_weight builds for a weight, only what the calls it serves read: the reordered rows (unless
// packed: packing reads them from scratch), the packed groups, or the planar rows (unless the stored int8 rows
// serve as they are) and, for AVX-512's product, their corrections.
struct PreparedPlan {
  bool taps_major = false;
  bool reorder = false;
  int64_t reordered_bytes = 0;     // 0: the GEMMs read the stored rows, or only packed ones
  int64_t packed_group_bytes = 0;  // 0: not packed
  bool planar = false;
  int64_t planar_bytes = 0;        // 0: no planar weight, or the stored rows
  int64_t corrections_bytes = 0;   // avx512::planar_corrections of the planar rows; 0 on AMX (signed tiles)
  int64_t groups = 1;

  PreparedPlan(Isa isa, const Conv2dShape& s, const WeightView& w, Layout layout, bool quantize_input) {
    if (s.depthwise()) return;  // the direct kernel dequantizes the stored rows
    taps_major = s.taps() == 1 || w.n_groups() == 1;
    groups = s.groups;
    const LinearKernels& lk = kernels(isa);
    planar = conv_runs_planar(isa, s, w, layout, quantize_input);
    reorder = s.taps() > 1 && taps_major && !planar;
    if (planar && !(s.taps() == 1 && w.bits == 8 && w.k_pad % 64 == 0 && w.n % 32 == 0))
      planar_bytes = round_up(amx::planar_rows_bytes(w, s.taps()), 64);
    else if (!planar && quantize_input && lk.packed_a8_bytes)
      packed_group_bytes = lk.packed_a8_bytes(group_rows(w, 0, s.group_out()));
    if (reorder && packed_group_bytes == 0) reordered_bytes = round_up(w.n * w.row_bytes(), 64);
    if (planar && isa != Isa::amx)
      corrections_bytes = round_up(avx512::planar_corrections_len(w.n) * int64_t{sizeof(int32_t)}, 64);
  }
  int64_t planar_offset() const { return reordered_bytes + groups * packed_group_bytes; }
  int64_t bytes() const { return planar_offset() + planar_bytes + corrections_bytes; }
};

}  // namespace

bool conv_runs_planar(Isa isa, const Conv2dShape& s, const WeightView& w, Layout layout, bool quantize_input) {
  const bool unpadded_1x1 = s.kernel_h == 1 && s.kernel_w == 1 && s.pad_h == 0 && s.pad_w == 0;
  const bool stride_1 = s.stride_h == 1 && s.stride_w == 1;
  return quantize_input && (stride_1 || (unpadded_1x1 && layout == Layout::nchw)) &&
         s.groups == 1 &&
         !s.depthwise() && ((isa == Isa::amx && amx_usable()) || isa == Isa::avx512) && w.n_groups() == 1 &&
         amx::planar_row_bytes(w, s.taps()) <= kPlanarMaxK;
}

int64_t prepared_conv_weight_bytes(Isa isa, const Conv2dShape& s, const WeightView& w, Layout layout,
                                   bool quantize_input) {
  return PreparedPlan(isa, s, w, layout, quantize_input).bytes();
}

PreparedConvWeight prepare_conv_weight(Isa isa, const Conv2dShape& s, const WeightView& w, Layout layout,
                                       bool quantize_input, uint8_t* memory, const Parallel& par) {
  const PreparedPlan plan(isa, s, w, layout, quantize_input);
  PreparedConvWeight p;
  p.view = w;
  p.taps_major = plan.taps_major;
  if (plan.reorder) {
    uint8_t* rows = plan.reordered_bytes > 0 ? memory : scratch<uint8_t>(Scratch::reordered_rows, w.n * w.row_bytes());
    p.view = reorder_taps_major(conv_kernels(isa), w, s.group_in(), s.taps(), rows, par);
  }
  if (plan.packed_group_bytes > 0) {
    int8_t* packed = reinterpret_cast<int8_t*>(memory + plan.reordered_bytes);
    const LinearKernels& lk = kernels(isa);
    const int64_t ng = s.group_out(), units = (ng + kPackedA8Columns - 1) / kPackedA8Columns;
    run_for(par, s.groups * units, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = i / units, n0 = i % units * kPackedA8Columns;
        lk.pack_a8(group_rows(p.view, g, ng), n0, std::min(ng, n0 + kPackedA8Columns),
                   packed + g * plan.packed_group_bytes);
      }
    });
    p.packed = packed;
    p.packed_group_bytes = plan.packed_group_bytes;
    if (plan.reorder) p.view.qdata = nullptr;  // the reordered rows were scratch; the GEMMs read the packed ones
  }
  if (plan.planar) {
    int8_t* rows = reinterpret_cast<int8_t*>(memory + plan.planar_offset());
    if (plan.planar_bytes > 0) amx::planar_rows(w, s.taps(), rows);
    p.planar = plan.planar_bytes > 0 ? rows : static_cast<const int8_t*>(w.qdata);  // int8 rows that fit as stored
    if (plan.corrections_bytes > 0) {
      int32_t* corrections = reinterpret_cast<int32_t*>(memory + plan.planar_offset() + plan.planar_bytes);
      const int64_t ld_w = amx::planar_row_bytes(w, s.taps());
      run_for(par, avx512::planar_corrections_len(w.n), [&](int64_t n0, int64_t n1) {
        avx512::planar_corrections(p.planar, ld_w, n0, n1, corrections);
      });
      p.planar_corrections = corrections;
    }
  }
  return p;
}

void conv2d(Isa isa, const Conv2dShape& s, Layout layout, const float* x, const WeightView& w, const float* bias,
            bool quantize_input, float* out, const Parallel& par) {
  if (s.batch == 0) return;
  uint8_t* memory =
      scratch<uint8_t>(Scratch::prepared_weight, prepared_conv_weight_bytes(isa, s, w, layout, quantize_input));
  conv2d(isa, s, layout, x, prepare_conv_weight(isa, s, w, layout, quantize_input, memory, par), bias,
         quantize_input, out, par);
}

void conv2d(Isa isa, const Conv2dShape& s, Layout layout, const float* x, const PreparedConvWeight& pw,
            const float* bias, bool quantize_input, float* out, const Parallel& par) {
  if (s.batch == 0) return;
  const ConvKernels& ck = conv_kernels(isa);
  if (s.depthwise()) {
    depthwise(ck, s, layout, x, pw.view, bias, quantize_input, out, par);
    return;
  }
  const bool direct = direct_rows(s);
  const WeightView& w = pw.view;
  const int64_t C = s.in_channels, pixels = s.height * s.width, image = C * pixels;
  const int64_t blocks = (pixels + kPixelBlock - 1) / kPixelBlock;

  if (pw.planar) {
    if (s.stride_h == 1 && s.stride_w == 1)
      planar_conv(isa, ck, s, layout, x, pw, bias, out, par);
    else
      planar_strided_1x1(isa, ck, s, x, pw, bias, out, par);
    return;
  }
  if (quantize_input) {
    const int64_t ld = direct ? w.k_pad : C;  // direct: the rows must carry the GEMM's zero padding
    int8_t* xq = scratch<int8_t>(Scratch::activations, s.batch * pixels * ld);
    const std::vector<float> scales =
        for_each_image(ck, x, s.batch, image, blocks, true, par, [&](int64_t b, float scale, int64_t u0, int64_t u1) {
          quantize_pixels(ck, s, layout, x, b, scale, u0 * kPixelBlock, std::min(u1 * kPixelBlock, pixels), xq, ld);
        });
    GemmConv<int8_t>{s, layout, kernels(isa), ck, pw, xq, ld, direct, w.k_pad, scales.data(), bias, out}.run(par);
    return;
  }
  const float* nhwc = x;
  if (layout == Layout::nchw) {  // channels innermost, for the GEMM rows
    float* transposed = scratch<float>(Scratch::activations, s.batch * image);
    for_each_image(ck, x, s.batch, image, blocks, false, par, [&](int64_t b, float, int64_t u0, int64_t u1) {
      const int64_t p0 = u0 * kPixelBlock, p1 = std::min(u1 * kPixelBlock, pixels);
      ck.transpose(x + b * image + p0, C, p1 - p0, pixels, transposed + b * image + p0 * C, C, false);
    });
    nhwc = transposed;
  }
  GemmConv<float>{s, layout, kernels(isa), ck, pw, nhwc, C, direct, w.k, nullptr, bias, out}.run(par);
}

}  // namespace qk
