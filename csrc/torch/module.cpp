// The op schemas (defined once, here) and the pybind11 module. The CPU implementations are in linear.cpp and
// conv2d.cpp; the CUDA ones are Triton kernels registered from quantkernels/triton.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "../core/kernels.h"

namespace qk_torch {  // conv2d.cpp
int64_t prepack_conv2d(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point,
                       int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, int64_t groups, bool quantize_input, bool channels_last);
std::pair<int64_t, int64_t> prepacked_conv2d_weights();
}  // namespace qk_torch

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "quantkernels native core: CPU kernels and instruction-set selection";
  m.attr("FORMAT_VERSION") = qk::kFormatVersion;
  m.def("active_isa", [] { return std::string(qk::isa_name(qk::active_isa())); },
        "The instruction set the CPU kernels use now.");
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (qk::Isa isa : {qk::Isa::portable, qk::Isa::avx2, qk::Isa::avx512, qk::Isa::amx})
      if (qk::isa_supported(isa)) names.push_back(qk::isa_name(isa));
    return names;
  }, "Instruction sets this CPU can run, slowest first.");
  m.def("set_isa", [](const std::string& name) {
    qk::Isa isa;
    TORCH_CHECK_VALUE(qk::parse_isa(name.c_str(), &isa), "isa: got '", name,
                      "', expected one of portable, avx2, avx512, amx");
    TORCH_CHECK_VALUE(qk::set_active_isa(isa), "isa: got '", name, "', which this CPU does not support");
  }, "Forces the CPU kernels onto one instruction set (what QUANTKERNELS_ISA does at start-up).");
  m.def("prepack_conv2d", [](const at::Tensor& qweight, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& zero_point, int64_t in_channels,
                             std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, int64_t groups, bool quantize_input, bool channels_last) {
    return qk_torch::prepack_conv2d(qweight, scale, zero_point, in_channels, kernel_size, stride, padding, groups,
                                    quantize_input, channels_last);
  }, "Prepares a conv weight for the active instruction set now, as its first call would; returns its bytes.");
  m.def("prepacked_conv2d_weights", &qk_torch::prepacked_conv2d_weights,
        "(count, bytes) of the prepared conv weights held for live weight tensors.");
}
