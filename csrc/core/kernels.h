// The optimized linear kernels behind one table per instruction set, chosen once at run time.
// Torch-free: callers pass raw pointers and the range of output rows [n_begin, n_end) this call computes,
// so that the binding can split N over its thread pool.
#pragma once

#include <cstdint>

#include "formats.h"

namespace qk {

// Instruction-set levels, each a superset of the one before: amx is avx512 plus the AMX tile unit (bf16, int8).
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };

// Element type of the float activations the weight-only kernels read. They convert to float32 while staging x,
// so the binding hands over bfloat16 and float16 tensors without making a float copy.
enum class ActType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct LinearKernels {
  const char* name;
  // y[r][n] = sum_k x[r][k] * W[n][k] + bias[n] for r < m, n_begin <= n < n_end, accumulated in float32.
  // x: [m][w.k] of element type x_type, dense. y: float [m][w.n]. bias: float [w.n] or nullptr.
  void (*linear_f32)(const WeightView& w, const void* x, ActType x_type, int64_t m, const float* bias, float* y,
                     int64_t n_begin, int64_t n_end);
  // The same with int8 activations: xq [m][w.k_pad] (zero past w.k), x_scale [m] from quantize_rows.
  // A row whose x_scale is not finite produces NaN. stream: y is not read again soon, so whole aligned vectors
  // may be written around the caches (a hint: the AVX-512 kernel takes it).
  void (*linear_a8)(const WeightView& w, const int8_t* xq, const float* x_scale, int64_t m, const float* bias,
                    float* y, int64_t n_begin, int64_t n_end, bool stream);
  // Dynamic per-row int8 quantization of x [m][k] into xq [m][k_pad] and x_scale [m] (see formats.h).
  void (*quantize_rows)(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* xq, float* x_scale);
  // Weight rows [n_begin, n_end) as float32, out [n_end - n_begin][w.k]: (code - zero) * scale, rounded once,
  // as the reference dequantizes. For tall float inputs, where a float GEMM on decoded panels beats decoding
  // every weight in the inner loop.
  void (*dequantize_rows)(const WeightView& w, int64_t n_begin, int64_t n_end, float* out);

  // A weight packed once for linear_a8, for callers that run it many times (conv). Only tables whose linear_a8
  // repacks the weight per call have these; elsewhere they are null.
  // Bytes of w packed whole, 0 where this machine cannot run the packed kernel (then call linear_a8).
  int64_t (*packed_a8_bytes)(const WeightView& w) = nullptr;
  // Packs rows [n_begin, n_end) of w into their place in `packed` (64-byte aligned, packed_a8_bytes(w) bytes);
  // n_begin and n_end multiples of kPackedA8Columns (n_end may be w.n).
  void (*pack_a8)(const WeightView& w, int64_t n_begin, int64_t n_end, int8_t* packed) = nullptr;
  // linear_a8 on a packed weight; n_begin a multiple of kPackedA8Columns.
  void (*linear_a8_packed)(const WeightView& w, const int8_t* packed, const int8_t* xq, const float* x_scale,
                           int64_t m, const float* bias, float* y, int64_t n_begin, int64_t n_end,
                           bool stream) = nullptr;
};

// Output columns of one packed unit of pack_a8 / linear_a8_packed.
constexpr int64_t kPackedA8Columns = 32;

const char* isa_name(Isa isa);
// Parses "portable", "avx2", "avx512" or "amx"; returns false on anything else.
bool parse_isa(const char* name, Isa* out);
bool isa_supported(Isa isa);
// AMX-TILE, AMX-BF16 and AMX-INT8 present and the tile state granted by the OS (asked for on the first call):
// with AVX-512, the amx level. Its kernels also check it, so that no call ever faults.
bool amx_usable();
// Whether the amx table's linear_f32 runs this product on AMX bf16 tiles (int4 weights in whole 64-byte
// blocks, 2 bfloat16 rows or 3 float16 / float32 rows or more, usable AMX); otherwise it runs the avx512 FMA
// kernel. Compiled for the amx level like that kernel: call it only where active_isa() is amx.
bool amx_tiles_apply(const WeightView& w, ActType t, int64_t m);
Isa best_isa();
// QUANTKERNELS_ISA if set (it must name a supported ISA), else best_isa(); overridable by set_active_isa.
Isa active_isa();
// Returns false (and changes nothing) if the machine lacks `isa`.
bool set_active_isa(Isa isa);
const LinearKernels& kernels(Isa isa);
inline const LinearKernels& active_kernels() { return kernels(active_isa()); }

// Per-ISA tables, each defined in its own translation unit.
const LinearKernels& portable_kernels();
const LinearKernels& avx2_kernels();
const LinearKernels& avx512_kernels();
const LinearKernels& amx_kernels();

}  // namespace qk
