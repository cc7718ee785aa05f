// avx512 kernels: the weight-only linear is in linear_f32_avx512.cpp; the int8-activation slots reuse the portable
// kernels until their SIMD versions land.
#include "kernels.h"
#include "linear_f32.h"

namespace qk {

const LinearKernels& avx512_kernels() {
  static const LinearKernels table{"avx512", linear_f32_avx512, portable_kernels().linear_a8,
                                   portable_kernels().quantize_rows};
  return table;
}

}  // namespace qk
