// avx512 kernels: placeholder table that reuses the portable kernels until the SIMD versions land.
#include "kernels.h"

namespace qk {

const LinearKernels& avx512_kernels() {
  static const LinearKernels table{"avx512", portable_kernels().linear_f32, portable_kernels().linear_a8,
                                   portable_kernels().quantize_rows};
  return table;
}

}  // namespace qk
