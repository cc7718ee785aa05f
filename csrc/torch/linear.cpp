// CPU implementations of the quant::linear_* ops.
#include <vector>

#include "common.h"

namespace qk_torch {
namespace {

at::Tensor linear_impl(int bits, bool act_int8, const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                       const c10::optional<at::Tensor>& bias) {
  check_activation(x);
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k > 0, "x: got in_features=0, expected at least 1");  // before the weight check divides by k
  BoundWeight w(check_weight(bits, k, qweight, scale, zero_point, x.device()), qweight, scale, zero_point);
  check_bias(bias, w.view.n, x.device());
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = run_linear(w.view, x2, bias_f, act_int8);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(w.view.n);
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl(8, false, x, qweight, scale, c10::nullopt, bias);
}
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias) {
  return linear_impl(4, false, x, qweight, scale, zero_point, bias);
}
at::Tensor linear_w8a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_impl(8, true, x, qweight, scale, c10::nullopt, bias);
}
at::Tensor linear_w4a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias) {
  return linear_impl(4, true, x, qweight, scale, zero_point, bias);
}

}  // namespace
}  // namespace qk_torch

TORCH_LIBRARY_IMPL(quant, CPU, m) {
  m.impl("linear_int8", &qk_torch::linear_int8);
  m.impl("linear_int4", &qk_torch::linear_int4);
  m.impl("linear_w8a8", &qk_torch::linear_w8a8);
  m.impl("linear_w4a8", &qk_torch::linear_w4a8);
}
