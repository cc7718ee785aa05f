// avx2 kernels: the weight-only linear is in linear_f32_avx2.cpp, the int8-activation kernels in
// linear_a8_avx2.cpp.
#include "kernels.h"
#include "linear_a8.h"
#include "linear_f32.h"

namespace qk {

const LinearKernels& avx2_kernels() {
  static const LinearKernels table{"avx2", linear_f32_avx2, avx2::linear_a8, avx2::quantize_rows,
                                  dequantize_rows_avx2};
  return table;
}

}  // namespace qk
