"""Registers the Triton kernels as the CUDA implementations of the ``quant::`` ops (schemas in
csrc/torch/module.cpp, fakes in quantkernels/ops.py).

``torch.library.triton_op`` would define a new op; these schemas already exist, so this does by hand what it
does for its own ops (torch/_library/triton.py, torch 2.13):

* eager CUDA calls: ``register_kernel(..., "cuda")`` with ``wrap_triton`` disabled, i.e. plain Triton launches;
* ``torch.compile``: a FunctionalTensorMode rule replaces the op on CUDA inputs by its body, so the launches
  are traced as ``triton_kernel_wrapper_functional`` nodes that Inductor compiles and fuses with the graph
  around them (CPU inputs keep the opaque op and its C++ kernel);
* ``torch.export``: the op stays a single node, so exported programs keep naming ``quant::`` ops.
"""

from __future__ import annotations

import torch
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from .conv2d import conv2d
from .linear import linear


def _linear_int8(x, qweight, scale, bias=None):
    return linear(8, False, x, qweight, scale, None, bias)


def _linear_w8a8(x, qweight, scale, bias=None):
    return linear(8, True, x, qweight, scale, None, bias)


def _linear_int4(x, qweight, scale, zero_point=None, bias=None):
    return linear(4, False, x, qweight, scale, zero_point, bias)


def _linear_w4a8(x, qweight, scale, zero_point=None, bias=None):
    return linear(4, True, x, qweight, scale, zero_point, bias)


def _conv2d_int8(x, qweight, scale, bias, kernel_size, stride, padding, dilation, groups, quantize_input):
    return conv2d(8, x, qweight, scale, None, bias, kernel_size, stride, padding, dilation, groups, quantize_input)


def _conv2d_int4(x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
                 quantize_input):
    return conv2d(4, x, qweight, scale, zero_point, bias, kernel_size, stride, padding, dilation, groups,
                  quantize_input)


IMPLEMENTATIONS = {
    "linear_int8": _linear_int8,
    "linear_w8a8": _linear_w8a8,
    "linear_int4": _linear_int4,
    "linear_w4a8": _linear_w4a8,
    "conv2d_int8": _conv2d_int8,
    "conv2d_int4": _conv2d_int4,
}


def _eager(impl):
    def kernel(*args, **kwargs):
        with set_wrap_triton_enabled(False):  # real tensors: skip the tracing wrapper (~1 ms per launch)
            return impl(*args, **kwargs)

    return kernel


def _traced(impl):
    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if args[0].device.type != "cuda" or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(not issubclass(t, (torch._subclasses.FakeTensor, FunctionalTensor)) and t is not torch.Tensor
               for t in types):
            return NotImplemented  # another tensor subclass: let it handle the op first, as triton_op does
        with mode:
            return impl(*args, **kwargs)

    return rule


for _name, _impl in IMPLEMENTATIONS.items():
    torch.library.register_kernel(f"quant::{_name}", "cuda", _eager(_impl))
    torch.library.register_torch_dispatch(f"quant::{_name}", FunctionalTensorMode, _traced(_impl))
