// avx512 kernels: linear_a8 and quantize_rows are the SIMD kernels of linear_a8_avx512.cpp; linear_f32 reuses the
// portable kernel until its SIMD version lands.
#include "kernels.h"
#include "linear_a8.h"

namespace qk {

const LinearKernels& avx512_kernels() {
  static const LinearKernels table{"avx512", portable_kernels().linear_f32, avx512::linear_a8,
                                   avx512::quantize_rows};
  return table;
}

}  // namespace qk
