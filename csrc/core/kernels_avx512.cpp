// avx512 kernels: the weight-only linear is in linear_f32_avx512.cpp, the int8-activation kernels in
// linear_a8_avx512.cpp.
#include "kernels.h"
#include "linear_a8.h"
#include "linear_f32.h"

namespace qk {

const LinearKernels& avx512_kernels() {
  static const LinearKernels table{"avx512", linear_f32_avx512, avx512::linear_a8, avx512::quantize_rows,
                                    dequantize_rows_avx512};
  return table;
}

}  // namespace qk
