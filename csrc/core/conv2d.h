// Quantized conv2d on CPU, torch-free. One entry point, conv2d(), picks the path:
//
//   depthwise (groups == in_channels == out_channels, any kernel): direct convolution with the weight
//     dequantized per call (C x kh x kw floats), no GEMM;
//   stride 1, one group, int8 activations, on AMX or AVX-512 VNNI: the planar product (amx::planar_a8,
//     avx512::planar_a8: output channels x pixels, the activations quantized in quads of channels, each tap's B
//     rows a shifted copy of those planes); NCHW input and output are never transposed, NHWC output is stored
//     as pixel rows by the epilogue or transposed chunk by chunk from cache; on VNNI small images' pixels share
//     chunks, so that 7x7 images do not leave a quarter of the lanes idle; an unpadded strided 1x1 conv on NCHW
//     likewise, on the pixels it reads (ConvKernels::subsample) with the whole images' scales;
//   1x1, stride 1, no padding, one group: the NHWC activation is the GEMM input as it stands;
//   otherwise im2col, a band of output pixels at a time, into the linear kernels (kernels.h), one GEMM per group.
//
// Dynamic int8 activations (quantize_input): one symmetric scale per image (formats.h), the image quantized once
// to int8 NHWC, then the integer GEMM (LinearKernels::linear_a8) with every im2col row carrying its image's scale.
// Weight-only: float NHWC activations into LinearKernels::linear_f32.
//
// GEMM rows must list K in the weight's order, stored as (cin, kh, kw). From NHWC that is a gather, so a weight
// with one scale group per output channel is reordered once (PreparedConvWeight) to (kh, kw, cin) (a permutation
// of each row, which keeps the one scale valid) and each im2col row is then kh*kw contiguous copies of cin
// values. A weight with several groups along K cannot be reordered (its groups would no longer be contiguous):
// im2col gathers instead.
#pragma once

#include <cstdint>
#include <functional>

#include "formats.h"
#include "kernels.h"

namespace qk {

// Memory layout of the 4-D activation and of the output (which takes the input's): NCHW or NHWC (channels_last),
// both dense.
enum class Layout : int { nchw = 0, nhwc = 1 };

struct Conv2dShape {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0, out_channels = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1, groups = 1;

  int64_t out_height() const { return (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  int64_t out_width() const { return (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t group_in() const { return in_channels / groups; }
  int64_t group_out() const { return out_channels / groups; }
  // K of the GEMM: one group's input channels times the kernel taps.
  int64_t k() const { return group_in() * taps(); }
  bool depthwise() const { return groups == in_channels && groups == out_channels; }
};

// How the caller runs work in parallel: torch's thread pool in the binding, a plain loop in the native tests.
struct Parallel {
  int64_t num_threads = 1;
  // Calls body(begin, end) on disjoint ranges that cover [0, n), possibly concurrently.
  std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& body)> for_range;
};

// A stored conv weight laid out for the GEMM kernels of one ISA: K permuted to (kh, kw, cin) where the rows can
// be (see above), and for int8 activations either the planar rows (conv_runs_planar) or, on a table with a packed
// kernel (LinearKernels::pack_a8), each group's rows packed for it. It depends on the weight, the ISA,
// quantize_input, the kernel size and groups, and whether the calls run planar, so it is built once
// (prepare_conv_weight) and reused by every such call: the binding keeps one per weight tensor.
struct PreparedConvWeight {
  WeightView view;                 // what the GEMMs read: the stored weight, or its reordered copy
  const int8_t* packed = nullptr;  // [groups][packed_group_bytes], or nullptr: the GEMMs pack per call
  int64_t packed_group_bytes = 0;
  const int8_t* planar = nullptr;  // the weight as amx::planar_rows lays it out, for NCHW int8 activations
  const int32_t* planar_corrections = nullptr;  // for avx512::planar_a8: -128 x each planar row's sum
  bool taps_major = false;         // view's K is in (kh, kw, cin) order
};

// Whether the conv runs planar: stride 1 (any kernel, padding and dilation) or, on NCHW, an unpadded 1x1 (any
// stride), one group (not depthwise), int8 activations, on usable AMX or on AVX-512 (VNNI), with one scale group
// per output channel (amx::planar_a8).
bool conv_runs_planar(Isa isa, const Conv2dShape& shape, const WeightView& w, Layout layout, bool quantize_input);
// Bytes of memory prepare_conv_weight needs (0: it only points at w). Only the shape's kernel, stride, padding and
// groups matter, not its batch or image size.
int64_t prepared_conv_weight_bytes(Isa isa, const Conv2dShape& shape, const WeightView& w, Layout layout,
                                   bool quantize_input);
// Prepares w for such calls into `memory` (64-byte aligned, prepared_conv_weight_bytes of it, alive as long as
// the result).
PreparedConvWeight prepare_conv_weight(Isa isa, const Conv2dShape& shape, const WeightView& w, Layout layout,
                                       bool quantize_input, uint8_t* memory, const Parallel& parallel);

// out = conv2d(x, W) + bias, in float32, on the kernels of `isa`.
//   x:    float [batch][in_channels][height][width] in `layout` (NHWC: [batch][height][width][in_channels]).
//   w:    the weight prepared for this isa, shape, layout and quantize_input.
//   bias: float [out_channels] or nullptr.
//   out:  float [batch][out_channels][out_h][out_w] in `layout`.
// The caller has checked the shapes (the binding does, message for message with quantkernels/ops.py).
void conv2d(Isa isa, const Conv2dShape& shape, Layout layout, const float* x, const PreparedConvWeight& w,
            const float* bias, bool quantize_input, float* out, const Parallel& parallel);
// The same from the stored weight (w.n = out_channels, w.k = shape.k() in (cin, kh, kw) order), prepared for
// this call in scratch memory.
void conv2d(Isa isa, const Conv2dShape& shape, Layout layout, const float* x, const WeightView& w, const float* bias,
            bool quantize_input, float* out, const Parallel& parallel);

// One NCHW plane of a depthwise conv and the buffer it is staged in: the input with its zero padding, split by
// the horizontal stride, so that the inputs of consecutive output columns are consecutive floats for every tap.
// Padded column j of padded row i is at staged[i * row_stride + (j % stride_w) * phase_len + j / stride_w].
struct DepthwisePlane {
  float* staged = nullptr;  // (in_h + 2 pad_h) x row_stride floats, zero at every padding position
  float* row = nullptr;     // in_w floats of scratch (a row before it is split by a stride > 1)
  // [kernel_h * kernel_w]: where tap (kh, kw) of output (0, 0) is in `staged`, the same offset for every output
  // with the staged position of its (0, 0) tap as origin.
  const int64_t* tap_offset = nullptr;
  int64_t row_stride = 0, phase_len = 0;
  int64_t in_h = 0, in_w = 0, pad_h = 0, pad_w = 0;
  int64_t out_h = 0, out_w = 0, kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1;
  int64_t dilation_h = 1, dilation_w = 1;
};
// Floats a depthwise kernel may read past the last column of a phase (one vector, lanes it then discards).
constexpr int64_t kDepthwisePlaneSlack = 16;

// The per-ISA data-movement and depthwise kernels conv2d is built from: one source (conv2d_simd.inc) compiled
// once per instruction set, at that set's vector width.
struct ConvKernels {
  const char* name;
  // max |x[i]| over n floats; NaN if any x[i] is NaN (the per-image absmax of formats.h).
  float (*absmax)(const float* x, int64_t n);
  // out[i] = nearbyint(x[i] / scale) with a float32 division, for a finite scale > 0 (|x[i]| <= 127 * scale).
  void (*quantize_int8)(const float* x, int64_t n, float scale, int8_t* out);
  void (*quantize_f32)(const float* x, int64_t n, float scale, float* out);
  // dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols. stream: dst is not read again soon (the
  // output of a large conv), so whole aligned vectors are written around the caches where the ISA can.
  void (*transpose)(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst,
                    bool stream);
  // The same transpose, quantized as quantize_int8 does: NCHW floats into NHWC codes in one pass.
  void (*quantize_transposed)(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float scale,
                              int8_t* dst, int64_t ld_dst);
  // Channel quads [q_begin, q_end) of an image src [channels][ld_src] as codes (quantize_int8's) in the 4-byte
  // words of dst [quads][ld_dst]: byte j of dst word (q, p) is channel 4q + j at pixel p, zero past `channels`
  // and past `pixels`. ld_dst is a multiple of the vector width, in words.
  void (*quantize_quads)(const float* src, int64_t channels, int64_t pixels, int64_t ld_src, float scale,
                         int8_t* dst, int64_t ld_dst, int64_t q_begin, int64_t q_end);
  // The same words from channels-innermost pixels src [pixels][ld_src] (NHWC): every quad of `channels`, words
  // [0, width) of each quad row, zero past `pixels`; width a multiple of 4, at most ld_dst.
  void (*quantize_quads_nhwc)(const float* src, int64_t channels, int64_t pixels, int64_t ld_src, float scale,
                              int8_t* dst, int64_t ld_dst, int64_t width);
  // For output pixels [p0, p0 + len) of a stride-1 conv (output rows out_width wide), the words of one tap in each
  // of `quads` planes: dst[q * ld_dst + p - p0] = src[q * ld_src + (oh + dy) * width + ow + dx] for output pixel
  // p = (oh, ow), zero where (oh + dy, ow + dx) falls outside the height x width plane. The planar product's B rows
  // for a conv with taps.
  void (*tap_quads)(const int32_t* src, int64_t quads, int64_t ld_src, int64_t height, int64_t width,
                    int64_t out_width, int64_t dy, int64_t dx, int64_t p0, int64_t len, int32_t* dst, int64_t ld_dst);
  // dst[oh * out_w + ow] = src[oh * stride_h * width + ow * stride_w]: the pixels of a plane [.][width] that an
  // unpadded 1x1 conv with these strides reads.
  void (*subsample)(const float* src, int64_t width, int64_t stride_h, int64_t stride_w, int64_t out_h,
                    int64_t out_w, float* dst);
  // dst[t * cin + ci] = src[ci * taps + t]: one weight row's K from (cin, kh, kw) to (kh, kw, cin) order.
  void (*reorder_taps)(const uint8_t* src, int64_t cin, int64_t taps, uint8_t* dst);
  // Stages the plane src [in_h][in_w] into p.staged (as codes, quantize_f32 by `scale`, when quantize; zeros for
  // an unusable scale), then out[oh][ow] = scale * sum_{kh,kw} w[kh * kernel_w + kw] *
  // padded(oh * stride_h + kh * dilation_h, ow * stride_w + kw * dilation_w) + bias, with scale 1 if not quantize.
  void (*depthwise_plane)(const DepthwisePlane& p, const float* src, bool quantize, const float* w, float scale,
                          float bias, float* out);
  // Output rows [oh_begin, oh_end) of one NHWC image: out[oh][ow][c] = scale * sum_{kh,kw} w_tc[kh][kw][c] *
  // x[ih][iw][c] (taps inside the image) + bias[c]. x holds the image's rows from row0 on, at least those these
  // outputs read; staged: x was just written (it is in cache). w_tc: float [taps][C]; bias: float [C] or nullptr.
  void (*depthwise_nhwc)(const Conv2dShape& s, const float* x, int64_t row0, bool staged, const float* w_tc,
                         const float* bias, float scale, float* out, int64_t oh_begin, int64_t oh_end);
};

const ConvKernels& conv_kernels(Isa isa);
const ConvKernels& portable_conv_kernels();
const ConvKernels& avx2_conv_kernels();
const ConvKernels& avx512_conv_kernels();

}  // namespace qk
