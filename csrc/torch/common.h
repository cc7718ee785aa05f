// Shared by the CPU op implementations (linear.cpp, conv2d.cpp): argument checks that mirror
// quantkernels/ops.py message for message, and the thread split over output rows.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "../core/kernels.h"

namespace qk_torch {


inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Dtypes as Python spells them, so messages read the same from the kernel and from the fake.
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_group_len(int64_t g) {
  for (int s : qk::kGroupSizes)
    if (g == s) return true;
  return false;
}

// Validates a stored weight against an activation with k columns and returns a view of it.
// Mirrors quantkernels/ops.py:check_weight; messages name the argument, what it got and what it expects.
inline qk::WeightView check_weight(int bits, int64_t k, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& zero_point, const at::Device& device) {
  const auto want_q = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK_TYPE(qweight.scalar_type() == want_q, "qweight: got dtype ", dtype_str(qweight.scalar_type()), ", expected ",
                   dtype_str(want_q), " for int", bits, " weights");
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) > 0 && qweight.size(1) > 0, "qweight: got shape ",
                    shape_str(qweight), ", expected a non-empty 2-D (out_features, packed in_features) tensor");
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "scale: got dtype ", dtype_str(scale.scalar_type()),
                   ", expected float32");
  const int64_t n = qweight.size(0);
  const int64_t k_pad = bits == 8 ? qweight.size(1) : 2 * qweight.size(1);
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == n && scale.size(1) > 0 && k_pad % scale.size(1) == 0,
                    "scale: got shape ", shape_str(scale), ", expected (", n,
                    ", n_groups) with n_groups dividing the ", k_pad, " stored columns of qweight");
  const int64_t group_len = k_pad / scale.size(1);
  const bool per_channel = scale.size(1) == 1 && k_pad == qk::padded_k(bits, k, 0);
  const bool grouped = is_group_len(group_len) && k_pad == qk::padded_k(bits, k, group_len);
  TORCH_CHECK_VALUE(per_channel || grouped, "qweight: got ", k_pad, " stored columns in ", scale.size(1),
                    " groups for an activation with in_features=", k,
                    ", expected in_features padded to a multiple of the group size (one of 32, 64, 128, 256) ",
                    "or one group per row (", qk::padded_k(bits, k, 0), " columns)");
  if (zero_point.has_value()) {
    TORCH_CHECK_VALUE(bits == 4, "zero_point: got a tensor for int8 weights, expected None (int8 is symmetric)");
    TORCH_CHECK_TYPE(zero_point->scalar_type() == at::kByte, "zero_point: got dtype ", dtype_str(zero_point->scalar_type()),
                     ", expected uint8");
    TORCH_CHECK_VALUE(zero_point->sizes() == scale.sizes(), "zero_point: got shape ", shape_str(*zero_point),
                      ", expected the shape of scale ", shape_str(scale));
    TORCH_CHECK_VALUE(zero_point->device() == device, "zero_point: got device ", zero_point->device(),
                      ", expected ", device, " like x");
  }
  TORCH_CHECK_VALUE(qweight.device() == device, "qweight: got device ", qweight.device(), ", expected ", device,
                    " like x");
  TORCH_CHECK_VALUE(scale.device() == device, "scale: got device ", scale.device(), ", expected ", device,
                    " like x");
  qk::WeightView w;
  w.bits = bits;
  w.n = n;
  w.k = k;
  w.k_pad = k_pad;
  w.group_len = group_len;
  return w;
}

inline void check_activation(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   "x: got dtype ", dtype_str(x.scalar_type()), ", expected float32, bfloat16 or float16");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: got a 0-d tensor, expected shape (..., in_features)");
}

inline void check_bias(const c10::optional<at::Tensor>& bias, int64_t n, const at::Device& device) {
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias: got dtype ", dtype_str(bias->scalar_type()),
                   ", expected a floating dtype");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias: got shape ", shape_str(*bias), ", expected (",
                    n, ",)");
  TORCH_CHECK_VALUE(bias->device() == device, "bias: got device ", bias->device(), ", expected ", device,
                    " like x");
}

// Holds contiguous copies so that the raw pointers in the view stay valid for the call.
struct BoundWeight {
  at::Tensor qweight, scale, zero_point;
  qk::WeightView view;
  BoundWeight(qk::WeightView v, const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z)
      : qweight(q.contiguous()), scale(s.contiguous()), view(v) {
    view.qdata = qweight.data_ptr();
    view.scale = scale.data_ptr<float>();
    if (z.has_value()) {
      zero_point = z->contiguous();
      view.zero_point = zero_point.data_ptr<uint8_t>();
    }
  }
};

// Output rows are handed to threads in tiles of this many, so SIMD kernels see whole tiles of W.
constexpr int64_t kRowTile = 16;

template <typename Fn>
void parallel_over_rows(int64_t n, const Fn& fn) {
  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    fn(begin * kRowTile, std::min(end * kRowTile, n));
  });
}

inline qk::ActType act_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return qk::ActType::bf16;
    case at::kHalf: return qk::ActType::f16;
    default: TORCH_CHECK(t == at::kFloat, "internal: activation dtype ", dtype_str(t)); return qk::ActType::f32;
  }
}

// Weight-only products with at least this many activation rows run as float32 GEMMs (torch's BLAS) on weight
// panels dequantized per call. The weight-only kernels decode in the inner loop, a cost per weight and row;
// a panel's decode is paid once for all rows. Measured on 2 threads, weights in cache, kernel / GEMM route:
// 4096x4096 at M = 32: 8.2 / 13.0 ms, M = 48: 12.2 / 12.4, M = 64: 16.3 / 12.2 (fp32 F.linear 12.4);
// 1536x384 at M = 32: 0.28 / 0.32 ms, M = 48: 0.43 / 0.36. The exception: bfloat16 and float16 products the
// amx path runs on AMX bf16 tiles (qk::amx_tiles_apply), faster than a float32 GEMM. float32 rows take three
// bf16 pieces there, five rows per pass over the weights, a cost linear in M: 4096x4096 at M = 128 would take
// ~29 ms on tiles against the GEMM's 19 (at M = 48, ~8 ms against 12; the GEMM route is kept from 48 rows).
constexpr int64_t kFloatGemmMinRows = 48;

inline bool use_float_gemm(const qk::WeightView& w, qk::ActType x_type, int64_t m) {
  if (m < kFloatGemmMinRows) return false;
  return x_type == qk::ActType::f32 || !(qk::active_isa() == qk::Isa::amx && qk::amx_tiles_apply(w, x_type, m));
}

// y [m][n] = xf [m][k] @ W^T + bias, W decoded a panel of rows at a time, each panel's GEMM on one thread.
// Panels of 256 rows: narrower ones cost the BLAS efficiency (4096x4096 at M = 128 on one thread: 45.6 ms in
// 64-row panels, 35.6 ms in 256-row ones, 38.2 ms as one GEMM); fewer rows where N would leave a thread idle.
inline void linear_by_panels(const qk::LinearKernels& kern, const qk::WeightView& w, const at::Tensor& xf,
                             const at::Tensor& bias_f, at::Tensor& y) {
  const int64_t per_thread = (w.n + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t panel = std::clamp<int64_t>((per_thread + kRowTile - 1) / kRowTile * kRowTile, kRowTile, 256);
  const int64_t panels = (w.n + panel - 1) / panel;
  const int64_t m = xf.size(0);
  const float* bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * panel, rows = std::min(panel, w.n - n0);
      at::Tensor decoded = at::empty({rows, w.k}, xf.options());
      kern.dequantize_rows(w, n0, n0 + rows, decoded.data_ptr<float>());
      // A fresh product, copied in through pointers: worker threads do not inherit the caller's InferenceMode,
      // so an out= write into y (an inference tensor under torch.inference_mode) would be refused there.
      const at::Tensor product = at::mm(xf, decoded.t()).contiguous();
      const float* src = product.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < rows; ++j) out[r * w.n + n0 + j] = src[r * rows + j] + (bias ? bias[n0 + j] : 0.0f);
    }
  });
}

// The int8-activation kernels pack the weight columns of their range once per call and stage activations per
// call: split over columns, every thread stages all M rows. From M > 4 N (measured: 25088 x 64 -> 256, 2 threads,
// 9.6 ms split by columns) the rows are split instead, and each thread packs the whole (small) weight.
constexpr int64_t kTallRatio = 4;

// Runs y = x @ W^T + bias on 2-D contiguous rows x2 [m][k] (float32, bfloat16 or float16); returns float [m][n].
// The weight-only kernels read x2 in its own dtype; the int8-activation path quantizes from float32.
inline at::Tensor run_linear(const qk::WeightView& w, const at::Tensor& x2, const at::Tensor& bias_f, bool act_int8) {
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, w.n}, x2.options().dtype(at::kFloat));
  if (m == 0) return y;
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto& kern = qk::active_kernels();
  if (!act_int8) {
    const qk::ActType type = act_type(x2.scalar_type());
    if (use_float_gemm(w, type, m)) {
      linear_by_panels(kern, w, x2.to(at::kFloat).contiguous(), bias_f, y);
      return y;
    }
    const void* xp = x2.data_ptr();
    parallel_over_rows(w.n, [&](int64_t b, int64_t e) {
      kern.linear_f32(w, xp, type, m, bias_ptr, y.data_ptr<float>(), b, e);
    });
    return y;
  }
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({m, w.k_pad}, x2.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x2.options().dtype(at::kFloat));
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    kern.quantize_rows(xf.data_ptr<float>() + b * w.k, e - b, w.k, w.k_pad, xq.data_ptr<int8_t>() + b * w.k_pad,
                       xs.data_ptr<float>() + b);
  });
  if (m > kTallRatio * w.n) {  // tall and narrow (a conv-like GEMM): split the rows, each thread every column
    at::parallel_for(0, (m + kRowTile - 1) / kRowTile, 1, [&](int64_t b, int64_t e) {
      const int64_t r0 = b * kRowTile, r1 = std::min(m, e * kRowTile);
      kern.linear_a8(w, xq.data_ptr<int8_t>() + r0 * w.k_pad, xs.data_ptr<float>() + r0, r1 - r0, bias_ptr,
                     y.data_ptr<float>() + r0 * w.n, 0, w.n, false);
    });
    return y;
  }
  parallel_over_rows(w.n, [&](int64_t b, int64_t e) {
    kern.linear_a8(w, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), m, bias_ptr, y.data_ptr<float>(), b, e, false);
  });
  return y;
}

}  // namespace qk_torch
