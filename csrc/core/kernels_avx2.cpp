// avx2 kernels: placeholder table that reuses the portable kernels until the SIMD versions land.
#include "kernels.h"

namespace qk {

const LinearKernels& avx2_kernels() {
  static const LinearKernels table{"avx2", portable_kernels().linear_f32, portable_kernels().linear_a8,
                                   portable_kernels().quantize_rows};
  return table;
}

}  // namespace qk
