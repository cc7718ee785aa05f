// CPU implementations of the quant::conv2d_* ops.
#include "common.h"

namespace qk_torch {
namespace {

// Conv as im2col into the linear kernels, one GEMM per conv group. Dynamic activations are quantized per
// image (one scale per batch element), so every im2col row of an image carries that image's scale.
at::Tensor conv2d_impl(int bits, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  check_activation(x);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: got shape ", shape_str(x), ", expected (batch, channels, height, width)");
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, "kernel_size: got ",
                    kernel_size, ", expected two positive ints");
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "stride: got ", stride,
                    ", expected two positive ints");
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding: got ", padding,
                    ", expected two non-negative ints");
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0, "dilation: got ", dilation,
                    ", expected two positive ints");
  const int64_t c = x.size(1), cout = qweight.dim() > 0 ? qweight.size(0) : 0;
  TORCH_CHECK_VALUE(groups > 0 && c % groups == 0 && cout % groups == 0, "groups: got ", groups,
                    ", expected a positive divisor of in_channels=", c, " and out_channels=", cout);
  const int64_t cg = c / groups, coutg = cout / groups;
  const int64_t k = cg * kernel_size[0] * kernel_size[1];
  BoundWeight w(check_weight(bits, k, qweight, scale, zero_point, x.device()), qweight, scale, zero_point);
  check_bias(bias, cout, x.device());
  const int64_t batch = x.size(0), h = x.size(2), wd = x.size(3);
  const int64_t oh = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t ow = (wd + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(oh > 0 && ow > 0, "x: got spatial size ", h, "x", wd, ", too small for kernel_size ",
                    kernel_size, " with padding ", padding, " and dilation ", dilation);
  at::Tensor out = at::empty({batch, cout, oh, ow}, x.options().dtype(at::kFloat));
  if (batch == 0) return out.to(x.scalar_type());

  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor image_scale;
  if (quantize_input) {
    image_scale = xf.reshape({batch, -1}).abs().amax(1) / static_cast<float>(qk::kActInt8QMax);
    at::Tensor nan_rows = xf.reshape({batch, -1}).isnan().any(1);
    image_scale = at::where(nan_rows, at::full_like(image_scale, NAN), image_scale);
    at::Tensor safe = at::where(image_scale.gt(0).logical_and(image_scale.isfinite()), image_scale,
                                at::ones_like(image_scale));
    xf = at::round(xf / safe.view({batch, 1, 1, 1}));
  }
  const int64_t l = oh * ow;
  for (int64_t g = 0; g < groups; ++g) {
    qk::WeightView wg = w.view;
    wg.n = coutg;
    wg.qdata = static_cast<const uint8_t*>(w.view.qdata) + g * coutg * w.view.row_bytes();
    wg.scale = w.view.scale + g * coutg * w.view.n_groups();
    if (wg.zero_point) wg.zero_point = w.view.zero_point + g * coutg * w.view.n_groups();
    at::Tensor cols = at::im2col(xf.narrow(1, g * cg, cg), kernel_size, dilation, padding, stride);  // [B, k, L]
    at::Tensor rows = cols.transpose(1, 2).reshape({batch * l, k}).contiguous();
    at::Tensor bias_g = bias.has_value() ? bias->narrow(0, g * coutg, coutg).to(at::kFloat).contiguous()
                                         : at::Tensor();
    at::Tensor y;
    if (quantize_input) {
      at::Tensor xq = at::zeros({batch * l, wg.k_pad}, rows.options().dtype(at::kChar));
      xq.narrow(1, 0, k).copy_(rows);
      at::Tensor xs = image_scale.repeat_interleave(l).contiguous();
      y = at::empty({batch * l, coutg}, rows.options());
      const float* bias_ptr = bias_g.defined() ? bias_g.data_ptr<float>() : nullptr;
      const auto& kern = qk::active_kernels();
      parallel_over_rows(coutg, [&](int64_t b, int64_t e) {
        kern.linear_a8(wg, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), batch * l, bias_ptr, y.data_ptr<float>(), b, e);
      });
    } else {
      y = run_linear(wg, rows, bias_g, false);
    }
    out.narrow(1, g * coutg, coutg).copy_(y.reshape({batch, oh, ow, coutg}).permute({0, 3, 1, 2}));
  }
  out = out.to(x.scalar_type());
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? out.contiguous(at::MemoryFormat::ChannelsLast)
             : out;
}

at::Tensor conv2d_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  return conv2d_impl(8, x, qweight, scale, c10::nullopt, bias, kernel_size, stride, padding, dilation, groups,
                     quantize_input);
}
at::Tensor conv2d_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  return conv2d_impl(4, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
                     quantize_input);
}

}  // namespace
}  // namespace qk_torch

TORCH_LIBRARY_IMPL(quant, CPU, m) {
  m.impl("conv2d_int8", &qk_torch::conv2d_int8);
  m.impl("conv2d_int4", &qk_torch::conv2d_int4);
}
