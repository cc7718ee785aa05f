// CPU implementations of the quant::conv2d_* ops: argument checks and tensor plumbing around qk::conv2d
// (csrc/core/conv2d.h), which runs its phases over torch's thread pool.
#include <functional>

#include "../core/conv2d.h"
#include "common.h"

namespace qk_torch {
namespace {

at::Tensor conv2d_impl(int bits, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool quantize_input) {
  check_activation(x);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: got shape ", shape_str(x), ", expected (batch, channels, height, width)");
  TORCH_CHECK_VALUE(x.size(1) > 0, "x: got in_channels=0, expected at least 1");
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
  const int64_t k = c / groups * kernel_size[0] * kernel_size[1];
  BoundWeight w(check_weight(bits, k, qweight, scale, zero_point, x.device()), qweight, scale, zero_point);
  check_bias(bias, cout, x.device());
  const int64_t batch = x.size(0), h = x.size(2), wd = x.size(3);
  const int64_t oh = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t ow = (wd + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(oh > 0 && ow > 0, "x: got spatial size ", h, "x", wd, ", too small for kernel_size ",
                    kernel_size, " with padding ", padding, " and dilation ", dilation);
  // The core reads and writes float32: other dtypes are converted on the way in and out.
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (batch == 0) return at::empty({0, cout, oh, ow}, x.options().memory_format(memory_format));
  at::Tensor xf = x.to(at::kFloat).contiguous(memory_format);
  at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  qk::Conv2dShape shape;
  shape.batch = batch;
  shape.in_channels = c;
  shape.height = h;
  shape.width = wd;
  shape.out_channels = cout;
  shape.kernel_h = kernel_size[0];
  shape.kernel_w = kernel_size[1];
  shape.stride_h = stride[0];
  shape.stride_w = stride[1];
  shape.pad_h = padding[0];
  shape.pad_w = padding[1];
  shape.dilation_h = dilation[0];
  shape.dilation_w = dilation[1];
  shape.groups = groups;

  if (!quantize_input && !shape.depthwise() && batch * oh * ow >= kFloatGemmMinRows) {
    // Weight-only over many output pixels: torch's float conv on the weight dequantized per call, for the
    // reason linear_by_panels exists (common.h). A conv's weight is small beside its activations, so its
    // decode is cheap. Depthwise convs stay on the direct kernel, which beats the float conv.
    at::Tensor wf = at::empty({cout, c / groups, kernel_size[0], kernel_size[1]}, xf.options());
    const auto& kern = qk::active_kernels();
    parallel_over_rows(cout, [&](int64_t b, int64_t e) {
      kern.dequantize_rows(w.view, b, e, wf.data_ptr<float>() + b * k);
    });
    at::Tensor y = at::conv2d(xf, wf, bias_f.defined() ? c10::optional<at::Tensor>(bias_f) : c10::nullopt, stride,
                              padding, dilation, groups);
    return y.contiguous(memory_format).to(x.scalar_type());
  }

  at::Tensor out = at::empty({batch, cout, oh, ow}, x.options().dtype(at::kFloat).memory_format(memory_format));
  qk::Parallel parallel;
  parallel.num_threads = at::get_num_threads();
  parallel.for_range = [](int64_t n, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, 1, body);
  };
  qk::conv2d(qk::active_isa(), shape, channels_last ? qk::Layout::nhwc : qk::Layout::nchw, xf.data_ptr<float>(),
             w.view, bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, quantize_input, out.data_ptr<float>(),
             parallel);
  return out.to(x.scalar_type());
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
