// avx2 kernels: the weight-only linear is in linear_f32_avx2.cpp; the int8-activation slots reuse the portable
// kernels until their SIMD versions land.
#include "kernels.h"
#include "linear_f32.h"

namespace qk {

const LinearKernels& avx2_kernels() {
  static const LinearKernels table{"avx2", linear_f32_avx2, portable_kernels().linear_a8,
                                   portable_kernels().quantize_rows};
  return table;
}

}  // namespace qk
