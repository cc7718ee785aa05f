// The only torch-facing C++: op schemas (defined once, here), argument checks, CPU implementations that
// split work over torch's intra-op thread pool and call the torch-free core, and the pybind11 module.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "../core/kernels.h"

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Dtypes as Python spells them, so messages read the same from the kernel and from the fake.
std::string dtype_str(at::ScalarType t) {
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

bool is_group_len(int64_t g) {
  for (int s : qk::kGroupSizes)
    if (g == s) return true;
  return false;
}

// Validates a stored weight against an activation with k columns and returns a view of it.
// Mirrors quantkernels/ops.py:check_weight; messages name the argument, what it got and what it expects.
qk::WeightView check_weight(int bits, int64_t k, const at::Tensor& qweight, const at::Tensor& scale,
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

void check_activation(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   "x: got dtype ", dtype_str(x.scalar_type()), ", expected float32, bfloat16 or float16");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: got a 0-d tensor, expected shape (..., in_features)");
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t n, const at::Device& device) {
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

// Runs y = x @ W^T + bias on 2-D float rows x2 [m][k]; returns float [m][n].
at::Tensor run_linear(const qk::WeightView& w, const at::Tensor& x2, const at::Tensor& bias_f, bool act_int8) {
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, w.n}, x2.options().dtype(at::kFloat));
  if (m == 0) return y;
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const auto& kern = qk::active_kernels();
  if (!act_int8) {
    const float* xp = x2.data_ptr<float>();
    parallel_over_rows(w.n, [&](int64_t b, int64_t e) { kern.linear_f32(w, xp, m, bias_ptr, y.data_ptr<float>(), b, e); });
    return y;
  }
  at::Tensor xq = at::empty({m, w.k_pad}, x2.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x2.options().dtype(at::kFloat));
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    kern.quantize_rows(x2.data_ptr<float>() + b * w.k, e - b, w.k, w.k_pad, xq.data_ptr<int8_t>() + b * w.k_pad,
                       xs.data_ptr<float>() + b);
  });
  parallel_over_rows(w.n, [&](int64_t b, int64_t e) {
    kern.linear_a8(w, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), m, bias_ptr, y.data_ptr<float>(), b, e);
  });
  return y;
}

at::Tensor linear_impl(int bits, bool act_int8, const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                       const c10::optional<at::Tensor>& bias) {
  check_activation(x);
  const int64_t k = x.size(-1);
  BoundWeight w(check_weight(bits, k, qweight, scale, zero_point, x.device()), qweight, scale, zero_point);
  check_bias(bias, w.view.n, x.device());
  TORCH_CHECK_VALUE(k > 0, "x: got in_features=0, expected at least 1");
  at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
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

// The schemas: the contract every backend (CPU here, CUDA in quantkernels/triton) implements.
TORCH_LIBRARY(quant, m) {
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point=None, Tensor? bias=None) -> Tensor");
  m.def("linear_w8a8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("linear_w4a8(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point=None, Tensor? bias=None) -> Tensor");
  m.def("conv2d_int8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool quantize_input) -> Tensor");
  m.def("conv2d_int4(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, Tensor? bias, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool quantize_input) -> Tensor");
}

TORCH_LIBRARY_IMPL(quant, CPU, m) {
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_w8a8", &linear_w8a8);
  m.impl("linear_w4a8", &linear_w4a8);
  m.impl("conv2d_int8", &conv2d_int8);
  m.impl("conv2d_int4", &conv2d_int4);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quantkernels native core: CPU kernels and instruction-set selection";
  m.attr("FORMAT_VERSION") = qk::kFormatVersion;
  m.def("active_isa", [] { return std::string(qk::isa_name(qk::active_isa())); },
        "The instruction set the CPU kernels use now.");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (qk::Isa isa : {qk::Isa::portable, qk::Isa::avx2, qk::Isa::avx512})
      if (qk::isa_supported(isa)) names.push_back(qk::isa_name(isa));
    return names;
  }, "Instruction sets this CPU can run, slowest first.");
  m.def("set_isa", [](const std::string& name) {
    qk::Isa isa;
    TORCH_CHECK_VALUE(qk::parse_isa(name.c_str(), &isa), "isa: got '", name,
                      "', expected one of portable, avx2, avx512");
    TORCH_CHECK_VALUE(qk::set_active_isa(isa), "isa: got '", name, "', which this CPU does not support");
  }, "Forces the CPU kernels onto one instruction set (what QUANTKERNELS_ISA does at start-up).");
}
