// The conv2d kernels for portable: conv2d_simd.inc at 4 floats per vector.
#include <cmath>
#include <cstdint>
#include <limits>

#include "conv2d.h"

#define QK_CONV_VEC_FLOATS 4
#include "conv2d_simd.inc"

namespace qk {

const ConvKernels& portable_conv_kernels() {
  static const ConvKernels table{"portable", absmax, quantize_int8, quantize_f32, transpose,
                                 quantize_transposed, quantize_quads, quantize_quads_nhwc, tap_quads,
                                 subsample, reorder_taps, depthwise_plane, depthwise_nhwc};
  return table;
}

}  // namespace qk
