// avx2 kernels: linear_a8 and quantize_rows are the SIMD kernels of linear_a8_avx2.cpp; linear_f32 reuses the
// portable kernel until its SIMD version lands.
#include "kernels.h"
#include "linear_a8.h"

namespace qk {

const LinearKernels& avx2_kernels() {
  static const LinearKernels table{"avx2", portable_kernels().linear_f32, avx2::linear_a8, avx2::quantize_rows};
  return table;
}

}  // namespace qk
