// amx kernels: the avx512 table with both linear kernels on AMX tiles (linear_f32_amx.cpp, linear_a8_amx.cpp).
#include "kernels.h"
#include "linear_a8.h"
#include "linear_f32.h"

namespace qk {

const LinearKernels& amx_kernels() {
  static const LinearKernels table{"amx", linear_f32_amx, amx::linear_a8, avx512_kernels().quantize_rows,
                                    dequantize_rows_avx512, amx::packed_a8_bytes, amx::pack_a8,
                                    amx::linear_a8_packed};
  return table;
}

}  // namespace qk
